"""Conformance entries for mechanisms/memory_augmented_attention.py.

Built with two persistent memory slots, so that the suite runs the augmented path (the slots prepended to
the keys), once without slots (where a fully masked row is empty and must return the output bias), and
once with a kNN memory: the adapter passes `memory=` a fixed set of 5 stored keys and values per head (the
same for every batch element, so that a batch of one equals its row), from which each query retrieves 3.
The retrieval itself is checked against a brute-force sort in tests/test_memory_augmented_attention.py.
With need_weights the module returns the
local weights over the N persistent slots and the Tk keys, (B, H, Tq, N + Tk); the adapter returns the
(B, H, Tq, Tk) part on the keys, which no longer sums to 1 (the slots take the rest).
"""
import torch

from mechanisms.memory_augmented_attention import MemoryAugmentedAttention
from tests.conformance.registry import Entry, bias_row

NUM_PERSISTENT = 2


def keys_only_call(module, query, key=None, value=None, need_weights=False, **options):
    """The standard call; with need_weights, the weights on the keys without the persistent slots."""
    result = module(query, key, value, need_weights=need_weights, **options)
    if need_weights:
        out, weights = result
        return out, weights[..., module.num_persistent:]
    return result


def memory_call(module, query, key=None, value=None, **options):
    """keys_only_call with a fixed kNN memory of 5 entries per head, built in the query's dtype."""
    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        return keys_only_call(module, query, key, value, **options)  # let the module report the bad query
    g = torch.Generator().manual_seed(7)
    shape = (1, module.num_heads, 5, module.head_dim)
    memory = tuple(torch.randn(shape, generator=g).to(query.dtype).expand(query.size(0), -1, -1, -1)
                   for _ in range(2))
    return keys_only_call(module, query, key, value, memory=memory, **options)


ENTRIES = [
    Entry(name="memory_augmented_attention.MemoryAugmentedAttention[2 persistent slots]",
          build=lambda **kw: MemoryAugmentedAttention(d_model=8, num_heads=2, num_persistent=NUM_PERSISTENT, **kw),
          d_model=8, num_heads=2, call=keys_only_call, weights_sum_to_one=False,
          # a bias added to every key shifts the scores of the KEYS but not of the persistent slots, so here
          # (unlike plain attention) the key bias does get a gradient; nothing is exactly zero.
          unused={"gate": "mixes in the kNN memory branch, which runs only when memory= is passed"},
          exempt={"empty_rows": "the persistent slots are visible to every query, so no query row is ever "
                                "empty; tests/test_memory_augmented_attention.py::"
                                "test_persistent_slots_are_seen_even_when_every_key_is_masked checks that case"}),
    Entry(name="memory_augmented_attention.MemoryAugmentedAttention[no slots]",
          build=lambda **kw: MemoryAugmentedAttention(d_model=8, num_heads=2, **kw),
          d_model=8, num_heads=2, call=keys_only_call, empty_row=bias_row("out_proj"),
          # a bias added to every key shifts all scores of a query row by the same q . b: softmax ignores it
          zero_grad=("k_proj.bias",),
          unused={"gate": "mixes in the kNN memory branch, which runs only when memory= is passed"}),
    Entry(name="memory_augmented_attention.MemoryAugmentedAttention[kNN memory]",
          build=lambda **kw: MemoryAugmentedAttention(d_model=8, num_heads=2, top_k=3, **kw),
          d_model=8, num_heads=2, call=memory_call,
          exempt={"empty_rows": "the kNN memory answers every query, so a row whose keys are all masked still "
                                "gets g * (memory branch), a value that depends on the query; tests/"
                                "test_memory_augmented_attention.py::test_gate_at_one_and_zero_gives_each_branch_alone "
                                "checks the two branches and their mixture"}),
]
NOT_ENTRIES = {
    "knn_lookup": "exact top-k retrieval, a helper of the kNN branch; tested in "
                  "tests/test_memory_augmented_attention.py::test_knn_lookup_equals_brute_force_top_k",
}
