"""Conformance entry for mechanisms/convolutional_attention.py (the project's standard forward signature)."""
from mechanisms.convolutional_attention import ConvolutionalAttention
from tests.conformance.registry import Entry, bias_row

ENTRIES = [
    Entry(name="convolutional_attention.ConvolutionalAttention",
          build=lambda **kw: ConvolutionalAttention(d_model=8, num_heads=2, kernel_size=3, **kw),
          d_model=8, num_heads=2, empty_row=bias_row("out_proj"),
          # a bias added to every (convolved) key shifts all scores of a query row by the same amount: softmax
          # ignores it. That bias is the key convolution's beta (a bias of k_proj becomes, through the kernel,
          # a different amount at the first k-1 keys, so it does matter)
          zero_grad=("k_conv.bias",)),
]
NOT_ENTRIES = {
    "causal_depthwise_conv": "a helper on (B, T, C) tensors, not attention; "
                             "tests/test_convolutional_attention.py::test_the_convolution_is_causal_and_depthwise",
}
