"""Every bad command line the examples can detect is one line, `<script>: error: ...` (exit status 2, from
argparse and the argument checks) or `error: ...` (status 1, from checks that need torch), never a
traceback; --help lists choices, shows each default once and describes every option.

Each case runs the script as a user would, in a subprocess from another folder. The scripts check their
arguments before `import torch` (see examples/cli.py), so most cases take a fraction of a second; the
few that need torch (is CUDA there? is the checkpoint in the right format?) take one torch import. The
cases run four at a time.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NO_CUDA = not torch.cuda.is_available()

# (id, script, arguments, exit status, text the error line must contain). In the arguments, {tmp} is a
# scratch folder, {file} an existing regular file, {bad_tsv} a --data file with a malformed line,
# {bad_date} one whose target is not an ISO date, {old_ckpt} a checkpoint in the examples' old format.
CASES = [
    # examples/train_char_lm.py
    ("lm-position", "train_char_lm.py", ["--position", "alibi"], 2, "argument --position: invalid choice"),
    ("lm-norm", "train_char_lm.py", ["--norm", "batchnorm"], 2, "argument --norm: invalid choice"),
    ("lm-activation", "train_char_lm.py", ["--activation", "tanh"], 2, "argument --activation: invalid choice"),
    ("lm-dropout", "train_char_lm.py", ["--dropout", "2"], 2, "argument --dropout: must be a number in [0, 1)"),
    ("lm-dropout-one", "train_char_lm.py", ["--dropout", "1"], 2, "argument --dropout"),
    ("lm-lr", "train_char_lm.py", ["--lr", "-1"], 2, "argument --lr: must be a number in (0"),
    ("lm-lr-text", "train_char_lm.py", ["--lr", "fast"], 2, "argument --lr: must be a number, got 'fast'"),
    ("lm-min-lr", "train_char_lm.py", ["--lr", "1e-3", "--min-lr", "1e-2"], 2, "--min-lr 0.01 must not exceed"),
    ("lm-out-file", "train_char_lm.py", ["--out", "{file}"], 2, "names an existing file"),
    ("lm-out-below-file", "train_char_lm.py", ["--out", "{file}/run"], 2, "no folder can be created below it"),
    ("lm-data-missing", "train_char_lm.py", ["--data", "{tmp}/missing.txt"], 2, "--data"),
    ("lm-data-folder", "train_char_lm.py", ["--data", "{tmp}"], 2, "not a regular file"),
    ("lm-save-corpus-folder", "train_char_lm.py", ["--save-corpus", "{tmp}"], 2, "is a folder"),
    ("lm-sample-chars", "train_char_lm.py", ["--sample-chars", "-5"], 2, "argument --sample-chars"),
    ("lm-log-interval", "train_char_lm.py", ["--log-interval", "0"], 2, "argument --log-interval"),
    ("lm-block-size", "train_char_lm.py", ["--block-size", "100000"], 2, "of total RAM"),
    ("lm-batch-size", "train_char_lm.py", ["--batch-size", "1000000", "--block-size", "1024"], 2, "of total RAM"),
    ("lm-n-embd-huge", "train_char_lm.py", ["--n-embd", "65536", "--n-head", "1"], 2, "of total RAM"),
    ("lm-n-layer", "train_char_lm.py", ["--n-layer", "0"], 2, "argument --n-layer: must be an integer in 1.."),
    ("lm-n-head", "train_char_lm.py", ["--n-head", "3"], 2, "must be divisible by --n-head 3"),
    ("lm-max-iters", "train_char_lm.py", ["--max-iters", "-1"], 2, "argument --max-iters"),
    ("lm-eval-iters", "train_char_lm.py", ["--eval-iters", "0"], 2, "argument --eval-iters"),
    ("lm-threads", "train_char_lm.py", ["--threads", "0"], 2, "argument --threads"),
    ("lm-seed", "train_char_lm.py", ["--seed", "-1"], 2, "argument --seed"),
    ("lm-target", "train_char_lm.py", ["--stop-at-target"], 2, "--stop-at-target needs --target-loss"),
    ("lm-resume-nothing", "train_char_lm.py", ["--resume", "--out", "{tmp}/empty"], 2, "no checkpoint at"),
    ("lm-device-tpu", "train_char_lm.py", ["--device", "tpu"], 2, "argument --device: invalid choice"),
    ("lm-device-cuda", "train_char_lm.py", ["--device", "cuda", "--out", "{tmp}/lm"], 1,
     "--device cuda: CUDA is not available"),
    # examples/translate_dates.py
    ("td-data-missing", "translate_dates.py", ["--data", "missing.tsv", "--out", "{tmp}/td"], 2,
     "--data missing.tsv: no such file"),
    ("td-data-malformed", "translate_dates.py", ["--data", "{bad_tsv}", "--out", "{tmp}/td"], 2,
     ":2: expected 'source<TAB>YYYY-MM-DD'"),
    ("td-data-bad-date", "translate_dates.py", ["--data", "{bad_date}", "--out", "{tmp}/td"], 2,
     ":1: target must be an ISO date"),
    ("td-device-tpu", "translate_dates.py", ["--device", "tpu"], 2, "argument --device: must be auto, cpu"),
    ("td-device-cuda", "translate_dates.py", ["--device", "cuda", "--out", "{tmp}/td"], 1,
     "--device cuda: CUDA is not available"),
    ("td-model", "translate_dates.py", ["--model", "lstm"], 2, "argument --model: invalid choice"),
    ("td-steps", "translate_dates.py", ["--steps", "0"], 2, "argument --steps"),
    ("td-lr", "translate_dates.py", ["--lr", "-1"], 2, "argument --lr"),
    ("td-warmup", "translate_dates.py", ["--warmup", "-1"], 2, "argument --warmup"),
    ("td-test-size", "translate_dates.py", ["--test-size", "100000"], 2, "held-out dates"),
    ("td-batch-size", "translate_dates.py", ["--batch-size", "1000000"], 2, "of total RAM"),
    ("td-out-file", "translate_dates.py", ["--out", "{file}"], 2, "names an existing file"),
    ("td-translate-empty", "translate_dates.py", ["--translate", ""], 2, "--translate '': must have 1 to 60"),
    # examples/compare_mechanisms.py and examples/benchmark_attention.py
    ("cmp-device-cuda", "compare_mechanisms.py", ["--device", "cuda", "--task", "mqar", "--mechanism",
                                                  "multi_head_attention", "--out", "{tmp}/cmp"], 1,
     "--device cuda: CUDA is not available"),
    ("cmp-non-mixer", "compare_mechanisms.py", ["--mechanism", "graph_attention"], 2, "listed as a non-mixer"),
    ("cmp-schedule", "compare_mechanisms.py", ["--schedule", "linear"], 2, "argument --schedule: invalid choice"),
    ("bench-device-cuda", "benchmark_attention.py", ["--device", "cuda", "--out", "{tmp}/bench"], 1,
     "--device cuda: CUDA is not available"),
    # examples/benchmark_generation.py
    ("gen-out-file", "benchmark_generation.py", ["--out", "{file}"], 2, "names an existing file"),
    ("gen-out-json", "benchmark_generation.py", ["--out", "{tmp}/gen.json"], 2, "--out is a folder"),
    ("gen-device-cuda", "benchmark_generation.py", ["--device", "cuda", "--out", "{tmp}/gen"], 1,
     "--device cuda: CUDA is not available"),
    ("gen-new-tokens", "benchmark_generation.py", ["--new-tokens", "0"], 2, "argument --new-tokens"),
    ("gen-too-long", "benchmark_generation.py", ["--new-tokens", "1000000"], 2, "of total RAM"),
    ("gen-repeats", "benchmark_generation.py", ["--repeats", "0"], 2, "argument --repeats"),
    ("gen-prompt", "benchmark_generation.py", ["--prompt", ""], 2, "--prompt is empty"),
    ("gen-checkpoint-missing", "benchmark_generation.py", ["--checkpoint", "{tmp}/none.pt"], 2, "no such file"),
    # examples/benchmark_training.py
    ("train-steps", "benchmark_training.py", ["--steps", "0"], 2, "argument --steps"),
    ("train-parts", "benchmark_training.py", ["--parts", "speed"], 2, "argument --parts: invalid choice"),
    ("train-out-file", "benchmark_training.py", ["--out", "{file}"], 2, "names an existing file"),
    ("train-peak", "benchmark_training.py", ["--peak-sizes", "100000"], 2, "argument --peak-sizes"),
    ("train-target", "benchmark_training.py", ["--target", "-1"], 2, "argument --target"),
    # examples/visualize_attention.py: a checkpoint from before the examples saved through Transformer.save
    ("vis-checkpoint-old", "visualize_attention.py", ["--checkpoint", "{old_ckpt}", "--out", "{tmp}/vis"], 1,
     "another format"),
]
NEEDS_NO_CUDA = {"lm-device-cuda", "td-device-cuda", "gen-device-cuda"}


def run(script: str, args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case once, four at a time; returns {id: (CompletedProcess, the scratch folder)}."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "a_file.txt").write_text("not a folder\n")
    (tmp / "bad.tsv").write_text("Mar 3, 21\t2021-03-03\nbad line\n", encoding="utf-8")
    (tmp / "bad_date.tsv").write_text("3 March 2021\t03/03/2021\n", encoding="utf-8")
    from transformer_implementation import Transformer  # the old format: a dict of the example's own
    model = Transformer(10, 16, 2, 1, 32, 8)
    torch.save({"format": "char-lm-checkpoint-v1", "model_config": model.config, "model": model.state_dict(),
                "vocab": "abcdefghij", "step": 1}, tmp / "old.pt")
    names = {"tmp": tmp, "file": tmp / "a_file.txt", "bad_tsv": tmp / "bad.tsv",
             "bad_date": tmp / "bad_date.tsv", "old_ckpt": tmp / "old.pt"}
    todo = [case for case in CASES if case[0] not in NEEDS_NO_CUDA or NO_CUDA]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case[0]: pool.submit(run, case[1], [a.format(**names) for a in case[2]], tmp)
                   for case in todo}
        return {name: (future.result(), tmp) for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_command_line_is_one_line_without_a_traceback(results, case):
    name, script, _, status, text = case
    if name in NEEDS_NO_CUDA and not NO_CUDA:
        pytest.skip("CUDA is available here, so --device cuda is not an error")
    proc, tmp = results[name]
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == status, proc.stderr
    prefix = f"{script}: error: " if status == 2 else "error: "
    assert lines[0].startswith(prefix), lines[0]
    assert text in lines[0]
    if name.startswith("td-data"):  # a refused --data leaves no empty run folder behind
        assert not (tmp / "td").exists()


def option_blocks(help_text: str) -> dict:
    """{option's first flag: its help text, whitespace joined} from argparse's --help output."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)  # signature, then help if it fits
            current = parts[0].split()[0].rstrip(",")
            blocks[current] = parts[1] if len(parts) > 1 else ""
        elif current is not None and line.startswith("    ") and line.strip():
            blocks[current] = (blocks[current] + " " + line.strip()).strip()
        else:
            current = None
    return blocks


SCRIPTS = ["train_char_lm.py", "translate_dates.py", "benchmark_generation.py", "benchmark_training.py"]


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("help")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {s: pool.submit(run, s, ["--help"], tmp) for s in SCRIPTS + ["plotting.py"]}
        return {s: f.result() for s, f in futures.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_every_option_and_shows_each_default_once(helps, script):
    proc = helps[script]
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    blocks = option_blocks(proc.stdout)
    assert "--out" in blocks and "--seed" in blocks
    for option, text in blocks.items():
        assert text, f"{script} {option} has no help text"
        assert text.count("(default") <= 1, f"{script} {option}: {text}"


def test_help_lists_the_choices_of_the_model_options(helps):
    text = helps["train_char_lm.py"].stdout
    for choices in ("{learned,rotary,sinusoidal}", "{layernorm,rmsnorm}", "{gelu,gelu_tanh,relu,swiglu}"):
        assert f"{choices}" in text


def test_plotting_says_it_is_a_library(helps):
    proc = helps["plotting.py"]
    assert proc.returncode == 0
    assert "library" in proc.stdout and "plot_loss_curves" in proc.stdout
