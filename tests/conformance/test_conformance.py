"""The generic checks, run once over every attention module of the project.

Every entry of the registry (tests/conformance/entries/*.py, one file per mechanism file and one for the
core) is put through the same checks; see CHECKS in registry.py for the list. A mechanism's own test file
keeps only what is specific to it (its oracle or limit case, distinctness from multi-head attention,
every argument mattering). A check that cannot apply to an entry is skipped with the reason the entry
gives, or the flag that rules it out; pytest's `-ra` summary prints every reason.

Tolerances: float64 comparisons use 1e-10 (the computations are a few dozen flops deep, so rounding is
~1e-14); float32 comparisons 1e-5; the dropout mean is compared to the eval output in units of its own
standard error.
"""
import ast
import copy
import pathlib

import pytest
import torch

from tests.conformance.registry import BROKEN, CHECKS, ENTRIES_DIR, Entry, load_registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENTRIES, NOT_ENTRIES = load_registry()
F64 = torch.float64
TOL64 = 1e-10


def entry_params(check):
    """Parametrise `check` over every entry, skipping (with the entry's reason) the ones that exempt it."""
    params = []
    for entry in ENTRIES:
        marks = []
        if check in entry.exempt:
            marks.append(pytest.mark.skip(reason=f"{entry.name}: {entry.exempt[check]}"))
        params.append(pytest.param(entry, id=entry.name, marks=marks))
    return pytest.mark.parametrize("entry", params)


# ---------------------------------------------------------------------------------------------------------
# Building and calling
# ---------------------------------------------------------------------------------------------------------

def build(entry: Entry, dtype=torch.float32, seed=0, **overrides):
    """The entry's module, with every bias randomised (so a dropped or misplaced bias is visible)."""
    torch.manual_seed(seed)
    module = entry.build(**overrides)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.5)
    return module.to(dtype).eval()


def lengths(entry: Entry):
    tq, tk = entry.lengths
    if entry.self_only or entry.same_length:
        tk = tq
    return tq, tk


def make_inputs(entry: Entry, batch=2, dtype=torch.float32, seed=1, tq=None):
    """(query, key, value): key and value are None for self-only entries."""
    g = torch.Generator().manual_seed(seed)
    default_tq, tk = lengths(entry)
    tq = default_tq if tq is None else tq
    if entry.self_only:
        tk = tq
    query = torch.randn(batch, tq, entry.d_model, generator=g).to(dtype)
    if entry.self_only:
        return query, None, None
    key = torch.randn(batch, tk, entry.kv_width, generator=g).to(dtype)
    value = torch.randn(batch, tk, entry.kv_width, generator=g).to(dtype)
    return query, key, value


def call(entry: Entry, module, query, key, value, mask=None, key_padding_mask=None, is_causal=False,
         need_weights=False):
    """Call through the entry's adapter, passing only the options that are set."""
    options = {}
    if mask is not None:
        options["mask"] = mask
    if key_padding_mask is not None:
        options["key_padding_mask"] = key_padding_mask
    if is_causal:
        options["is_causal"] = True
    if need_weights:
        options["need_weights"] = True
    return entry.call(module, query, key, value, **options)


def output(result):
    return result[0] if isinstance(result, tuple) else result


def tk_of(entry, query, key):
    return query.size(1) if key is None else key.size(1)


def padding_mask(batch, tk, hidden=2):
    """(B, Tk) key-padding mask: batch element 0 has its last `hidden` keys padded, the others none."""
    kpm = torch.ones(batch, tk, dtype=torch.bool)
    kpm[0, tk - hidden:] = False
    return kpm


def causal_option(entry):
    """Run causally if the entry can (the self-attention checks then respect causality)."""
    return "is_causal" in entry.masks and not entry.causal_always


def skip_unless(condition, reason):
    if not condition:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------------------
# The registry itself
# ---------------------------------------------------------------------------------------------------------

def public_names(path):
    """Top-level classes and functions a file defines whose names do not start with an underscore."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return sorted(node.name for node in tree.body
                  if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"))


SOURCES = {path.stem: path for path in sorted((ROOT / "mechanisms").glob("*.py")) if path.name != "__init__.py"}
SOURCES["core"] = ROOT / "transformer_implementation.py"


@pytest.mark.parametrize("stem", sorted(SOURCES))
def test_every_public_class_and_function_has_an_entry(stem):
    """A new file cannot skip the suite: each public name is an entry or is listed with a reason."""
    assert (ENTRIES_DIR / f"{stem}.py").exists(), (
        f"{SOURCES[stem].name} has no conformance entries: write tests/conformance/entries/{stem}.py")
    covered = {e.public_name for e in ENTRIES if e.stem == stem}
    listed = NOT_ENTRIES.get(stem, {})
    missing = [name for name in public_names(SOURCES[stem]) if name not in covered and name not in listed]
    assert not missing, f"{SOURCES[stem].name}: public names with no entry and no NOT_ENTRIES reason: {missing}"
    stale = sorted((covered | set(listed)) - set(public_names(SOURCES[stem])))
    assert not stale, f"entries/{stem}.py names things {SOURCES[stem].name} does not define: {stale}"
    assert all(reason.strip() for reason in listed.values()), f"entries/{stem}.py: a NOT_ENTRIES reason is empty"


def test_entry_files_import():
    assert not BROKEN, f"entry files that fail to import: {BROKEN}"


def test_entry_files_belong_to_existing_sources():
    for path in ENTRIES_DIR.glob("*.py"):
        if not path.name.startswith("_"):
            assert path.stem in SOURCES, f"{path.name} has no mechanisms/{path.stem}.py"


def test_entry_names_are_unique_and_reasons_are_given():
    names = [e.name for e in ENTRIES]
    assert len(names) == len(set(names)), "duplicate entry names"
    for entry in ENTRIES:
        assert set(entry.exempt) <= set(CHECKS), entry.name
        assert all(reason.strip() for reason in entry.exempt.values()), f"{entry.name}: empty exemption reason"
        assert all(reason.strip() for reason in entry.unused.values()), f"{entry.name}: empty `unused` reason"


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

def _raises(entry, exc, name, module, *args, **kwargs):
    """The call raises `exc` whose message names the argument (by the entry's name for it)."""
    shown = entry.arg_names.get(name, name)
    with pytest.raises(exc) as info:
        call(entry, module, *args, **kwargs)
    assert shown in str(info.value), f"{entry.name}: the error for a bad {name} does not name {shown!r}: {info.value}"


@entry_params("bad_input")
def test_bad_input_raises_a_clear_error(entry):
    module = build(entry)
    query, key, value = make_inputs(entry)
    batch, tq = query.shape[:2]
    tk = tk_of(entry, query, key)
    _raises(entry, ValueError, "query", module, query[0], key, value)  # rank 2
    wide = torch.randn(batch, tq, entry.d_model + 1)
    _raises(entry, ValueError, "query", module, wide, key, value)  # wrong feature width
    if not entry.self_only:
        _raises(entry, ValueError, "key", module, query, torch.cat([key, key[:1]]),
                torch.cat([value, value[:1]]))  # key batch B + 1
        _raises(entry, ValueError, "key", module, query, torch.randn(batch, tk, entry.kv_width + 1),
                torch.randn(batch, tk, entry.kv_width + 1))  # key width
        if entry.arg_names.get("value", "value"):  # "" = the module takes no separate value
            _raises(entry, ValueError, "value", module, query, key, value[:, :-1])  # value length != key length
    if "mask" in entry.masks:
        _raises(entry, ValueError, "mask", module, query, key, value,
                mask=torch.ones(batch, tq, tk, dtype=torch.bool))  # 3-D: refused
        _raises(entry, ValueError, "mask", module, query, key, value,
                mask=torch.ones(tq + 1, tk, dtype=torch.bool))  # wrong Tq
        _raises(entry, TypeError, "mask", module, query, key, value, mask=torch.ones(tq, tk))  # float
    if "key_padding_mask" in entry.masks:
        _raises(entry, ValueError, "key_padding_mask", module, query, key, value,
                key_padding_mask=torch.ones(batch, tk + 1, dtype=torch.bool))
        _raises(entry, ValueError, "key_padding_mask", module, query, key, value,
                key_padding_mask=torch.ones(tk, dtype=torch.bool))
        _raises(entry, TypeError, "key_padding_mask", module, query, key, value,
                key_padding_mask=torch.ones(batch, tk, dtype=torch.long))
    if entry.max_seq_len is not None:
        long_query, long_key, long_value = make_inputs(entry, tq=entry.max_seq_len + 1)
        _raises(entry, ValueError, "query", module, long_query, long_key, long_value)


@pytest.mark.parametrize("stem", sorted(SOURCES))
def test_bad_constructor_dropout_is_refused(stem):
    """Every entry that takes dropout refuses a probability outside [0, 1), naming `dropout`."""
    entries = [e for e in ENTRIES if e.stem == stem and e.dropout]
    if not entries:
        pytest.skip(f"no entry of {stem} takes dropout")
    for entry in entries:
        for bad in (-0.1, 1.0):
            with pytest.raises(ValueError, match="dropout"):
                entry.build(dropout=bad)


# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------

def _empty_row_setup(entry, batch, tq, tk):
    """Options that leave some query rows with no visible key, and a (B, Tq) bool of those rows."""
    empty = torch.zeros(batch, tq, dtype=torch.bool)
    if "key_padding_mask" in entry.masks:
        kpm = torch.ones(batch, tk, dtype=torch.bool)
        kpm[0] = False  # batch element 0 has no real key at all
        empty[0] = True
        return {"key_padding_mask": kpm}, empty
    if "mask" in entry.masks:
        mask = torch.ones(tq, tk, dtype=torch.bool)
        mask[1] = False  # query 1 may see nothing
        empty[:, 1] = True
        return {"mask": mask}, empty
    return None, None


@entry_params("empty_rows")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fully_masked_rows_give_the_documented_value_and_finite_gradients(entry, dtype):
    skip_unless(entry.empty_row is not None, f"{entry.name} declares no empty-row value (empty_row=None)")
    module = build(entry).to(dtype)
    query, key, value = make_inputs(entry, dtype=dtype)
    batch, tq = query.shape[:2]
    options, empty = _empty_row_setup(entry, batch, tq, tk_of(entry, query, key))
    skip_unless(options is not None, f"{entry.name} takes neither mask nor key_padding_mask")
    inputs = [t.clone().requires_grad_() for t in (query, key, value) if t is not None]
    args = inputs + [None] * (3 - len(inputs))
    try:
        out = output(call(entry, module, *args, **options))
    except (RuntimeError, NotImplementedError) as error:
        if dtype == torch.float16 and "not implemented" in str(error).lower():
            pytest.skip(f"float16 is not supported on this CPU build: {error}")
        raise
    assert torch.isfinite(out).all(), f"{entry.name}: non-finite output with fully masked rows in {dtype}"
    expected = entry.empty_row(module, entry.out_width, dtype, out.device)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    got = out[empty].float()
    assert (got - expected.float()).abs().max() <= tol * (1 + expected.float().abs().max()), (
        f"{entry.name}: a fully masked row gives {got[0]} instead of the documented {expected}")
    out.float().sum().backward()
    for tensor in inputs + list(module.parameters()):
        if tensor.grad is not None:  # None: an input the module does not read (e.g. no separate value)
            assert torch.isfinite(tensor.grad).all(), f"{entry.name}: non-finite gradient with fully masked rows"


@entry_params("masked_keys")
def test_masked_keys_have_no_influence(entry):
    skip_unless("key_padding_mask" in entry.masks, f"{entry.name} takes no key_padding_mask")
    module = build(entry, dtype=F64)
    query, key, value = make_inputs(entry, dtype=F64)
    batch, tq = query.shape[:2]
    tk = tk_of(entry, query, key)
    kpm = padding_mask(batch, tk)
    width = entry.kv_width if key is not None else entry.d_model
    noise = torch.randn(batch, tk, width, dtype=F64).masked_fill(kpm[..., None], 0.0)  # only at padded keys
    # Self-attention: the padded positions are queries too; only the other rows must stay unchanged.
    rows = torch.ones(batch, tq, dtype=torch.bool) if key is not None else kpm.clone()
    causal = causal_option(entry)
    weights = torch.randn(batch, tq, entry.out_width, dtype=F64)

    def run(q, k, v):
        tensors = [t.clone().requires_grad_() for t in (q, k, v) if t is not None]
        args = tensors + [None] * (3 - len(tensors))
        module.zero_grad(set_to_none=True)
        out = output(call(entry, module, *args, key_padding_mask=kpm, is_causal=causal))
        (out * weights * rows[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return out.detach(), grads, [t.grad for t in tensors]

    if key is None:
        base, grads, input_grads = run(query, None, None)
        moved, grads2, _ = run(query + noise, None, None)
        padded_grads = [input_grads[0][~kpm]]
    else:
        base, grads, input_grads = run(query, key, value)
        moved, grads2, _ = run(query, key + noise, value + noise)
        padded_grads = [g[~kpm] for g in input_grads[1:] if g is not None]  # None: input not read
    assert (base - moved)[rows].abs().max() <= TOL64, f"{entry.name}: a padded key changed an output"
    for name in grads:
        assert (grads[name] - grads2[name]).abs().max() <= TOL64, f"{entry.name}: a padded key changed d/d{name}"
    for g in padded_grads:
        assert g.abs().max() <= TOL64, f"{entry.name}: the loss has a gradient with respect to a padded key"


@entry_params("causal")
def test_future_tokens_do_not_change_earlier_outputs(entry):
    skip_unless("is_causal" in entry.masks or entry.causal_always, f"{entry.name} has no causal mode")
    module = build(entry, dtype=F64)
    query, _, _ = make_inputs(entry, dtype=F64)
    if entry.d_model != entry.kv_width:
        pytest.skip(f"{entry.name}: keys ({entry.kv_width}) and queries ({entry.d_model}) differ in width, "
                    f"so it cannot attend to its own input")
    t = query.size(1) // 2
    x = query.clone().requires_grad_()
    self_args = (x, None, None) if entry.self_only else (x, x, x)
    out = output(call(entry, module, *self_args, is_causal="is_causal" in entry.masks))
    out[:, :t].sum().backward()
    assert x.grad[:, t:].abs().max() <= TOL64, f"{entry.name}: an output before position {t} depends on a later token"
    moved = query.clone()
    moved[:, t:] += torch.randn_like(moved[:, t:])
    moved_args = (moved, None, None) if entry.self_only else (moved, moved, moved)
    out2 = output(call(entry, module, *moved_args, is_causal="is_causal" in entry.masks)).detach()
    assert (out2[:, :t] - out.detach()[:, :t]).abs().max() <= TOL64
    assert (out2[:, t:] - out.detach()[:, t:]).abs().max() > 1e-6, f"{entry.name}: later outputs ignore their tokens"


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------

@entry_params("gradcheck")
def test_gradcheck_over_inputs_and_parameters(entry):
    module = build(entry, dtype=F64)
    query, key, value = make_inputs(entry, dtype=F64)
    batch = query.size(0)
    options = {}
    if "key_padding_mask" in entry.masks:
        options["key_padding_mask"] = padding_mask(batch, tk_of(entry, query, key), hidden=1)
    if causal_option(entry) and (key is None or key.size(1) == query.size(1)):
        options["is_causal"] = True
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    inputs = [t.clone().requires_grad_() for t in (query, key, value) if t is not None]
    n_inputs = len(inputs)

    def f(*tensors):
        args = list(tensors[:n_inputs]) + [None] * (3 - n_inputs)
        state = dict(zip(names, tensors[n_inputs:]))
        with torch.nn.utils.stateless._reparametrize_module(module, state):
            return output(call(entry, module, *args, **options))

    assert torch.autograd.gradcheck(f, tuple(inputs + params), fast_mode=True, atol=1e-6, rtol=1e-4)


@entry_params("param_grads")
def test_every_parameter_that_can_matter_gets_a_gradient(entry):
    module = build(entry, dtype=F64)
    skip_unless(any(True for _ in module.parameters()), f"{entry.name} has no parameters")
    query, key, value = make_inputs(entry, dtype=F64)
    out = output(call(entry, module, query, key, value))
    (out * torch.randn_like(out)).sum().backward()
    # zero_grad names a whole parameter ("k_proj.bias") or a slice of one ("in_proj.bias[8:16]").
    zero = {}
    for spec in entry.zero_grad:
        name, _, rows = spec.partition("[")
        start, stop = (int(v) for v in rows.rstrip("]").split(":")) if rows else (None, None)
        zero.setdefault(name, []).append(slice(start, stop))
    for name, param in module.named_parameters():
        if name in entry.unused:
            continue
        grad = torch.zeros_like(param) if param.grad is None else param.grad
        free = torch.ones_like(param, dtype=torch.bool)
        for rows in zero.get(name, []):
            assert grad[rows].abs().max() <= 1e-10, (
                f"{entry.name}: {name}[{rows.start}:{rows.stop}] is documented to get an exactly zero gradient, "
                f"got {grad[rows].abs().max()}")
            free[rows] = False
        if free.any():
            assert grad[free].abs().max() > 0, f"{entry.name}: {name} gets no gradient"


# ---------------------------------------------------------------------------------------------------------
# Dropout and weights
# ---------------------------------------------------------------------------------------------------------

def _paths(entry):
    return [False, True] if entry.need_weights else [False]


@entry_params("dropout")
def test_dropout_is_off_in_eval_and_unbiased_in_train(entry):
    skip_unless(entry.dropout, f"{entry.name} takes no dropout argument")
    plain = build(entry, dropout=0.0)
    dropped = build(entry, dropout=0.3)
    dropped.load_state_dict(plain.state_dict())
    query, key, value = make_inputs(entry)
    for need_weights in _paths(entry):
        reference = output(call(entry, plain, query, key, value, need_weights=need_weights)).detach()
        assert torch.equal(output(call(entry, dropped.eval(), query, key, value, need_weights=need_weights)),
                           reference), f"{entry.name}: dropout is active in eval()"
        if not entry.stochastic:
            plain.train()
            same = output(call(entry, plain, query, key, value, need_weights=need_weights))
            plain.eval()
            assert (same - reference).abs().max() <= 1e-6, f"{entry.name}: train() with dropout 0 differs from eval()"
        dropped.train()
        torch.manual_seed(1234)
        samples = torch.stack([output(call(entry, dropped, query, key, value, need_weights=need_weights)).detach()
                               for _ in range(300)])
        dropped.eval()
        assert (samples[0] - reference).abs().max() > 1e-4, f"{entry.name}: dropout changes nothing in train()"
        mean, stderr = samples.mean(0), samples.std(0) / samples.size(0) ** 0.5
        z = ((mean - reference).abs() / (stderr + 1e-7)).max()
        assert z < 6.0, f"{entry.name} (need_weights={need_weights}): dropout is biased, max |z| = {z:.1f}"


@entry_params("weights")
def test_returned_weights_are_taken_before_dropout(entry):
    skip_unless(entry.need_weights, f"{entry.name} does not return weights")
    module = build(entry, dropout=0.3) if entry.dropout else build(entry)
    query, key, value = make_inputs(entry)
    batch, tq = query.shape[:2]
    tk = tk_of(entry, query, key)
    options = {"key_padding_mask": padding_mask(batch, tk)} if "key_padding_mask" in entry.masks else {}
    _, eval_weights = call(entry, module, query, key, value, need_weights=True, **options)
    assert eval_weights.shape == (batch, entry.num_heads, tq, tk), (
        f"{entry.name}: weights have shape {tuple(eval_weights.shape)}, expected {(batch, entry.num_heads, tq, tk)}")
    if entry.dropout and not entry.stochastic:
        module.train()
        _, train_weights = call(entry, module, query, key, value, need_weights=True, **options)
        module.eval()
        assert (train_weights - eval_weights).abs().max() <= 1e-6, f"{entry.name}: weights are taken after dropout"
    if options:
        assert eval_weights[0, ..., tk - 2:].abs().max() == 0, f"{entry.name}: a padded key gets weight"
    if entry.weights_sum_to_one:
        sums = eval_weights.sum(-1)
        assert (sums - 1).abs().max() <= 1e-5, f"{entry.name}: weight rows do not sum to 1"


@entry_params("mask_forms")
def test_a_two_dim_mask_acts_like_the_same_mask_in_four_dims(entry):
    """A (Tq, Tk) mask is shared by every batch element and head: written out as (B, 1, Tq, Tk) it must act
    exactly alike, on both paths; masked pairs get zero weight, and the mask changes the output."""
    skip_unless("mask" in entry.masks, f"{entry.name} takes no general mask")
    module = build(entry, dtype=F64)
    query, key, value = make_inputs(entry, dtype=F64)
    batch, tq = query.shape[:2]
    tk = tk_of(entry, query, key)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(tq, tk, generator=g) > 0.4
    mask[:, 0] = True  # every query keeps a key ...
    if entry.empty_row is not None:
        mask[1] = False  # ... except query 1, which sees nothing (the documented empty-row value)
    for is_causal in ([False, True] if causal_option(entry) else [False]):
        for need_weights in _paths(entry):
            two = call(entry, module, query, key, value, mask=mask, is_causal=is_causal, need_weights=need_weights)
            four = call(entry, module, query, key, value, mask=mask.expand(batch, 1, tq, tk), is_causal=is_causal,
                        need_weights=need_weights)
            assert (output(two) - output(four)).abs().max() <= TOL64, f"{entry.name}: 2-D and 4-D masks differ"
            if need_weights:
                assert (two[1] - four[1]).abs().max() <= TOL64
                hidden = two[1].masked_select(~mask.expand_as(two[1]))
                assert hidden.abs().max() == 0, f"{entry.name}: a masked pair has weight"
        unmasked = output(call(entry, module, query, key, value, is_causal=is_causal))
        assert (output(two) - unmasked).abs().max() > 1e-6, f"{entry.name}: the mask changed nothing"


@entry_params("fused_explicit")
def test_fused_and_explicit_paths_agree(entry):
    skip_unless(entry.need_weights, f"{entry.name} has one path only (no need_weights)")
    module = build(entry, dtype=F64)
    query, key, value = make_inputs(entry, dtype=F64)
    options = {}
    if "key_padding_mask" in entry.masks:
        options["key_padding_mask"] = padding_mask(query.size(0), tk_of(entry, query, key))
    if causal_option(entry):
        options["is_causal"] = True
    fused = output(call(entry, module, query, key, value, **options))
    explicit = output(call(entry, module, query, key, value, need_weights=True, **options))
    assert (fused - explicit).abs().max() <= TOL64


# ---------------------------------------------------------------------------------------------------------
# Housekeeping: state dict, layouts, batch, dtypes
# ---------------------------------------------------------------------------------------------------------

@entry_params("state_dict")
def test_state_dict_round_trip(entry):
    source = build(entry, seed=0)
    target = build(entry, seed=123)
    target.load_state_dict(source.state_dict())
    query, key, value = make_inputs(entry)
    assert torch.equal(output(call(entry, source, query, key, value)), output(call(entry, target, query, key, value)))


@entry_params("noncontiguous")
def test_noncontiguous_inputs(entry):
    module = build(entry, dtype=F64)
    inputs = make_inputs(entry, dtype=F64)
    strided = [None if t is None else t.transpose(0, 1).contiguous().transpose(0, 1) for t in inputs]
    assert all(t is None or not t.is_contiguous() for t in strided)
    assert (output(call(entry, module, *inputs)) - output(call(entry, module, *strided))).abs().max() <= TOL64


@entry_params("batch_one")
def test_batch_of_one_equals_its_row_of_the_batch(entry):
    module = build(entry, dtype=F64)
    query, key, value = make_inputs(entry, batch=3, dtype=F64)
    options = {}
    if "key_padding_mask" in entry.masks:
        options["key_padding_mask"] = padding_mask(3, tk_of(entry, query, key))
    full = output(call(entry, module, query, key, value, **options))
    for b in range(3):
        row = [None if t is None else t[b:b + 1] for t in (query, key, value)]
        one = {k: v[b:b + 1] for k, v in options.items()}
        assert (output(call(entry, module, *row, **one)) - full[b:b + 1]).abs().max() <= TOL64


@entry_params("to_float64")
def test_module_to_float64_matches_float32(entry):
    module = build(entry)
    query, key, value = make_inputs(entry)
    out32 = output(call(entry, module, query, key, value))
    module64 = copy.deepcopy(module).to(torch.float64)
    out64 = output(call(entry, module64, *[None if t is None else t.double() for t in (query, key, value)]))
    assert out64.dtype == torch.float64
    assert (out64 - out32.double()).abs().max() <= 1e-4 * (1 + out32.abs().max())


@entry_params("bf16")
def test_bfloat16_is_close_to_float32(entry):
    module = build(entry)
    query, key, value = make_inputs(entry)
    out32 = output(call(entry, module, query, key, value)).detach()
    module16 = copy.deepcopy(module).to(torch.bfloat16)
    out16 = output(call(entry, module16, *[None if t is None else t.bfloat16() for t in (query, key, value)]))
    assert out16.dtype == torch.bfloat16
    error = (out16.float() - out32).abs().max() / (out32.abs().max() + 1e-6)
    assert error <= entry.bf16_tol, f"{entry.name}: bf16 differs from float32 by {error:.3f} of the output scale"
