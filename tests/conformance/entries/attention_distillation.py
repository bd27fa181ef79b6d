"""Conformance entries for mechanisms/attention_distillation.py: none, the file defines a loss."""
ENTRIES = []
NOT_ENTRIES = {
    "attention_distillation_loss": "a loss between a student's and a teacher's attention (MiniLM), not an attention "
                                   "module: it has no query/key/value call, mask or output sequence to check; tested "
                                   "in tests/test_attention_distillation.py (exact zero, the KL written out, padding, "
                                   "different head widths, gradients, a trained student)",
}
