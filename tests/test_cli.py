"""The `obert` command: help, recipe check, data prepare, and train's argument handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from obert_modifiers import commands

ROOT = Path(__file__).resolve().parent.parent
OBERT = Path(sys.executable).parent / "obert"

GOOD_RECIPE = """\
num_epochs: 2.0
final: 0.5
modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !GMPruningModifier
    init_sparsity: 0.05
    final_sparsity: eval(final)
    start_epoch: 0.0
    end_epoch: 1.0
    update_frequency: 0.5
    params: ["re:bert.encoder.layer.*.intermediate.dense.weight"]
"""


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    commands.register(app)
    return app


@pytest.fixture
def run(app):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_obert_help_lists_the_commands():
    result = subprocess.run([str(OBERT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "recipe", "data", "demo"):
        assert command in result.stdout


def test_recipe_check_prints_every_modifier(run, tmp_path):
    result = run("recipe", "check", _recipe(tmp_path, GOOD_RECIPE))
    assert result.exit_code == 0, result.output
    assert "!GMPruningModifier" in result.output and "!EpochRangeModifier" in result.output
    assert "final_sparsity: 0.5" in result.output
    assert "inter_func: cubic" in result.output  # defaults are resolved too
    assert "training epochs: 2" in result.output


def test_recipe_check_applies_recipe_args(run, tmp_path):
    path = _recipe(tmp_path, GOOD_RECIPE)
    result = run("recipe", "check", path, "--recipe-args", "final=0.7", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    gmp = next(m for m in payload["modifiers"] if m["tag"] == "GMPruningModifier")
    assert gmp["params"]["final_sparsity"] == 0.7
    assert payload["max_epochs"] == 2
    result = run("recipe", "check", path, "--recipe-args", '{"fnal": 0.7}')
    assert result.exit_code == 2
    assert "'fnal' is not a variable" in result.output


def test_recipe_check_names_a_misspelled_key(run, tmp_path):
    path = _recipe(tmp_path, GOOD_RECIPE.replace("final_sparsity", "fianl_sparsity"))
    result = run("recipe", "check", path)
    assert result.exit_code == 2
    assert f"{path}:7" in result.output  # the line of the modifier's tag
    assert "!GMPruningModifier" in result.output
    assert "unknown recipe key 'fianl_sparsity'" in result.output
    assert "did you mean 'final_sparsity'" in result.output


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        (GOOD_RECIPE, "recipe.yml", "rename it to recipe.yaml"),
        (
            "modifiers:\n  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 1.0}\n",
            "recipe.yaml",
            "recipe.yaml:2: '!EpochRangeModifier' is followed by",
        ),
        (
            "modifiers:\n  - !GMPrunningModifier\n    start_epoch: 0\n",
            "recipe.yaml",
            "did you mean !GMPruningModifier",
        ),
        (
            "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n     end_epoch: 1\n",
            "recipe.yaml",
            "recipe.yaml:4: YAML syntax error",
        ),
        (
            "modifiers:\n  - !GMPruningModifier\n    start_epoch: 0\n",
            "recipe.yaml",
            "missing required recipe key(s): init_sparsity, final_sparsity",
        ),
        (
            "modifiers:\n  - !pytorch.EpochRangeModifier\n    end_epoch: 1\n",
            "recipe.yaml",
            "write '!EpochRangeModifier'",
        ),
        ("num_epochs: 1\n", "recipe.yaml", "no modifiers found"),
    ],
    ids=["yml", "flow-style", "unknown-tag", "yaml-error", "missing-keys", "namespaced-tag", "no-modifiers"],
)
def test_recipe_check_explains_bad_recipes(run, tmp_path, text, name, expected):
    result = run("recipe", "check", _recipe(tmp_path, text, name))
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_recipe_check_missing_file(run, tmp_path):
    result = run("recipe", "check", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "recipe file not found" in result.output


def test_recipe_check_accepts_our_demo_recipe(run):
    result = run("recipe", "check", ROOT / "recipes" / "demo.yaml")
    assert result.exit_code == 0, result.output


@pytest.mark.integration
def test_recipe_check_console_script_names_the_key(tmp_path):
    """The installed `obert` entry point, in a fresh process (tags registered by the start-up hook)."""
    path = _recipe(tmp_path, GOOD_RECIPE.replace("final_sparsity", "fianl_sparsity"))
    result = subprocess.run(
        [str(OBERT), "recipe", "check", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "fianl_sparsity" in result.stderr and "final_sparsity" in result.stderr


def test_train_refuses_a_folder_with_optimizer_state(run, tmp_path):
    model = tmp_path / "previous-output"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "optimizer.pt").write_bytes(b"")
    result = run(
        "train", "text-classification", "--model_name_or_path", model, "--output_dir", tmp_path / "out"
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "optimizer.pt" in text and "--allow-resume-state" in text and "resume" in text
    assert not (tmp_path / "out").exists()


def test_train_arguments():
    args = commands.prepare_train_args("text-classification", ["--model_name_or_path", "m", "--do_train"])
    assert args[-2:] == ["--save_safetensors", "False"]
    kept = commands.prepare_train_args("text-classification", ["--save_safetensors=True"])
    assert kept == ["--save_safetensors=True"]
    with pytest.raises(typer.BadParameter, match="unknown task 'text-generation'"):
        commands.prepare_train_args("text-generation", [])


def test_train_allows_resume_on_request(tmp_path):
    (tmp_path / "scheduler.pt").write_bytes(b"")
    args = commands.prepare_train_args(
        "text-classification", [f"--model_name_or_path={tmp_path}", commands.ALLOW_RESUME_FLAG]
    )
    assert commands.ALLOW_RESUME_FLAG not in args
    assert commands.resume_state_files(tmp_path) == ["scheduler.pt"]


def test_train_without_task_shows_help(run):
    result = run("train")
    assert result.exit_code == 2
    assert "text-classification" in result.output


def test_data_prepare(run, tmp_path):
    result = run("data", "prepare", "bbc", "--out", tmp_path / "bbc", "--max-train", "50", "--max-eval", "10")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "bbc" / "data.json").read_text())
    assert info["counts"]["train"] == 50 and info["counts"]["validation"] == 10
    assert "business" in result.output
    result = run("data", "prepare", "sst2", "--out", tmp_path / "x")
    assert result.exit_code == 2


@pytest.mark.integration
def test_obert_train_runs_the_stock_entry_point(tiny_bert_dir, bbc_data_dir, tmp_path):
    """`obert train` forwards to SparseML's text-classification main() and saves pytorch_model.bin."""
    recipe = _recipe(
        tmp_path, "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 1.0\n"
    )
    out = tmp_path / "out"
    command = [
        str(OBERT), "train", "text-classification",
        "--model_name_or_path", str(tiny_bert_dir),
        "--train_file", str(bbc_data_dir / "train.csv"),
        "--validation_file", str(bbc_data_dir / "validation.csv"),
        "--do_train", "--do_eval", "--max_seq_length", "32",
        "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
        "--output_dir", str(out), "--overwrite_output_dir", "--report_to", "none",
        "--save_strategy", "no", "--recipe", str(recipe),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_CACHE"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "datasets-cache")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "pytorch_model.bin").is_file()
    assert not (out / "model.safetensors").exists()  # the --save_safetensors False default
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert set(config["id2label"].values()) == {"business", "entertainment", "politics", "sports", "tech"}


# ------------------------------------------------------------------------------------------------
# errors: one line on stderr, exit 1, nothing half-written (the `obert` handler in cli.py)


def _obert(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    from _helpers import offline_env, run

    return run([OBERT, *args], env=offline_env(), cwd=cwd, timeout=600)


def _assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    line = errors[-1]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def _model_copy(source: Path, target: Path, architectures: list[str] | None = None, drop=()) -> Path:
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("deployment", *drop))
    if architectures is not None:
        config = json.loads((target / "config.json").read_text())
        config["architectures"] = architectures
        (target / "config.json").write_text(json.dumps(config))
    return target


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder nobody can create entries in: read-only for a normal user; /sys for root."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").mkdir()
    except OSError:
        return locked
    (locked / "probe").rmdir()
    try:
        os.mkdir("/sys/obert-probe")
    except OSError:
        return Path("/sys")
    pytest.skip("no folder here refuses writes (root without /sys)")


EXPORT_ERRORS = {
    # name: (how to build the model folder, extra arguments, fragments the one line must hold)
    "missing-model": (None, [], ["does not exist"]),
    "wrong-task": ("tiny", ["--task", "token-classification"], ["BertForSequenceClassification",
                                                                "--task text-classification"]),
    "token-model-as-text": ("token", [], ["BertForTokenClassification", "--task token-classification"]),
    "base-model": ("base", [], ["BertModel", "no text-classification head"]),
    "missing-tokenizer": ("no-tokenizer", [], ["has no tokenizer", "vocab.txt"]),
    "too-long": ("tiny", ["--sequence-length", "1024"], ["--sequence-length", "at most 512 tokens"]),
    "unknown-task": ("tiny", ["--task", "summarization"], ["unknown task 'summarization'"]),
    "read-only-out": ("tiny", ["--out", "LOCKED"], ["cannot write", "choose a folder you can write to"]),
}


@pytest.mark.parametrize("case", list(EXPORT_ERRORS))
def test_obert_export_errors_are_one_line_and_leave_nothing(tiny_bert_dir, tmp_path, case):
    kind, extra, fragments = EXPORT_ERRORS[case]
    models = tmp_path / "models"
    models.mkdir()
    model = models / "model"
    if kind == "tiny":
        model = _model_copy(tiny_bert_dir, model)
    elif kind == "token":
        model = _model_copy(tiny_bert_dir, model, ["BertForTokenClassification"])
    elif kind == "base":
        model = _model_copy(tiny_bert_dir, model, ["BertModel"])
    elif kind == "no-tokenizer":
        model = _model_copy(tiny_bert_dir, model, drop=("vocab.txt", "tokenizer.json"))
    locked = _unwritable_dir(tmp_path) if "LOCKED" in extra else None
    extra = [str(locked / "deployment") if a == "LOCKED" else a for a in extra]
    before = sorted(p.name for p in model.iterdir()) if model.exists() else None

    _assert_one_error_line(_obert("export", model, *extra), *fragments)
    assert not (model / "deployment").exists()
    after = sorted(p.name for p in model.iterdir()) if model.exists() else None
    assert after == before  # no staging folder, nothing else written
    assert sorted(p.name for p in models.iterdir()) == (["model"] if before is not None else [])
    if locked is not None:
        assert not (locked / "deployment").exists()


@pytest.mark.integration
def test_obert_export_takes_the_models_position_limit_and_benchmark_refuses_past_it(tmp_path):
    """A model with 64 position embeddings: `obert export` (default 128) exports at 64 and says so;
    an explicit longer --sequence-length is refused in one line; so is a longer benchmark."""
    from obert_modifiers.models import save_tiny_bert

    model = save_tiny_bert(tmp_path / "short", num_layers=1, max_position_embeddings=64)
    result = _obert("export", model)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at most 64 tokens" in result.stdout and "--sequence-length 64" in result.stdout
    manifest = json.loads((model / "deployment" / "export.json").read_text())
    assert manifest["sequence_length"] == 64

    refused = _obert("export", model, "--sequence-length", "128", "--out", tmp_path / "long")
    _assert_one_error_line(refused, "--sequence-length", "128", "at most 64 tokens", "64 or less")
    assert not (tmp_path / "long").exists()

    bench = _obert("benchmark", model / "deployment", "--engine", "onnxruntime", "--sequence-length", "512")
    _assert_one_error_line(bench, "--sequence-length", "at most 64 tokens")

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    json_out = _obert(
        "benchmark", model / "deployment", "-e", "onnxruntime", "-s", "16", "-t", "0.1", "-w", "0.01",
        "--json", blocker / "bench.json",
    )  # fmt: skip
    _assert_one_error_line(json_out, "cannot write --json", str(blocker / "bench.json"))
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["benchmark", "NOPE"], ["deployment folder", "does not exist"]),
        (["benchmark", "EMPTY"], ["has no model.onnx", "obert export"]),
        (["benchmark", "BADONNX", "-e", "onnxruntime"], ["not a readable ONNX model"]),
        (["benchmark", "BADMANIFEST", "-e", "onnxruntime"], ["export.json", "sequence_length"]),
        (["data", "prepare", "bbc", "--out", "FOREIGN"], ["not prepared data", "notes.txt"]),
        (["data", "prepare", "bbc", "--max-train", "40", "--out", "LOCKED"], ["cannot write"]),
    ],
    ids=[
        "bench-missing", "bench-empty", "bench-bad-onnx", "bench-bad-manifest", "data-foreign", "data-locked"
    ],  # fmt: skip
)
def test_other_commands_give_one_error_line(tmp_path, args, fragments):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_onnx = tmp_path / "bad-onnx"
    bad_onnx.mkdir()
    (bad_onnx / "model.onnx").write_bytes(b"not onnx at all")
    bad_manifest = tmp_path / "bad-manifest"
    bad_manifest.mkdir()
    (bad_manifest / "model.onnx").write_bytes(b"")
    (bad_manifest / "export.json").write_text(json.dumps({"task": "text-classification"}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    places = {
        "NOPE": tmp_path / "nope",
        "EMPTY": empty,
        "BADONNX": bad_onnx,
        "BADMANIFEST": bad_manifest,
        "FOREIGN": foreign,
    }
    if "LOCKED" in args:
        places["LOCKED"] = _unwritable_dir(tmp_path) / "data"
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_one_error_line(_obert(*[places.get(a, a) for a in args]), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["notes.txt"]
    if "LOCKED" in places:
        assert not places["LOCKED"].exists()


def test_any_obert_error_in_any_command_is_one_line_and_exit_1(tmp_path):
    """The one handler: a command that raises an ObertError (here one registered for the test, with
    a message that spans lines) prints `error: <message>` on one stderr line and exits 1; an
    error that is not ours still shows its traceback (a bug must not look like a user error)."""
    from _helpers import offline_env, run_python

    code = (
        "import sys\n"
        "from obert_modifiers import cli\n"
        "from obert_modifiers.errors import ObertError\n"
        "@cli.app.command('boom')\n"
        "def boom(kind: str):\n"
        "    if kind == 'ours':\n"
        "        raise ObertError('runs/x/recipe.yaml: bad key\\n  did you mean damp?')\n"
        "    raise KeyError('a bug')\n"
        "sys.argv = ['obert', 'boom', sys.argv[1]]\n"
        "cli.main()\n"
    )
    ours = run_python(code, "ours", env=offline_env())
    assert ours.returncode == 1 and ours.stdout == ""
    assert ours.stderr == "error: runs/x/recipe.yaml: bad key did you mean damp?\n"
    bug = run_python(code, "bug", env=offline_env())
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "KeyError: 'a bug'" in bug.stderr
    usage = _obert("export")  # click's usage errors stay as they are: exit 2
    assert usage.returncode == 2 and "Missing argument" in usage.stderr


def test_every_error_class_outside_the_hub_is_an_obert_error():
    from obert_modifiers.algorithms.layer_drop import LayerDropError
    from obert_modifiers.bench import BenchmarkError
    from obert_modifiers.data import DataPrepareError
    from obert_modifiers.demo import DemoError
    from obert_modifiers.deployment import DeploymentError
    from obert_modifiers.errors import ObertError
    from obert_modifiers.export import ExportError, ParityError
    from obert_modifiers.models import ModelConversionError
    from obert_modifiers.modifiers._base import RecipeParameterError
    from obert_modifiers.recipe_check import RecipeCheckError
    from obert_modifiers.resources import MissingResourceError

    builtin = {
        LayerDropError: ValueError,
        BenchmarkError: RuntimeError,
        DataPrepareError: ValueError,
        DemoError: RuntimeError,
        ExportError: RuntimeError,
        ParityError: RuntimeError,
        ModelConversionError: RuntimeError,
        RecipeParameterError: ValueError,
        RecipeCheckError: ValueError,
        MissingResourceError: FileNotFoundError,
        DeploymentError: Exception,
    }
    for error_class, base in builtin.items():
        assert issubclass(error_class, ObertError) and issubclass(error_class, base), error_class


def test_a_command_whose_stack_is_not_installed_names_the_extra(tiny_bert_dir, tmp_path):
    """The base install has no torch (the SparseML stack is the [sparseml] extra): `obert export` then
    says what to install, in one line, and writes nothing; a missing hub extra is named the same way."""
    from _helpers import offline_env, run

    out = tmp_path / "deployment"
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = {argv!r}; "
        "from obert_modifiers.cli import main; main()"
    )
    export = run(
        [sys.executable, "-c", code.format(argv=["obert", "export", str(tiny_bert_dir), "--out", str(out)])],
        env=offline_env(),
        timeout=300,
    )
    _assert_one_error_line(export, "needs torch", "obert-modifiers[sparseml]")
    assert not out.exists() and not list(tmp_path.iterdir())

    from obert_modifiers.cli import missing_extra_line

    assert "obert-modifiers[hub]" in missing_extra_line(ModuleNotFoundError("x", name="httpx"))
    assert missing_extra_line(ModuleNotFoundError("x", name="obert_modifiers.nope")) is None


def test_latency_table_measures_here_and_writes_a_table_the_modifier_reads(run, tmp_path):
    """``obert latency-table``: the table of a model folder's shape, at the depth asked for, measured on
    this machine and written to a file; the modifier's file check accepts it for that setting."""
    from obert_modifiers.algorithms.latency_search import LatencyTable
    from obert_modifiers.latency import read_table_file
    from obert_modifiers.models import save_tiny_bert

    model = save_tiny_bert(tmp_path / "model", num_layers=4, heads=2, intermediate=64)
    out = tmp_path / "table.json"
    result = run(
        "latency-table", model, "--output", out, "--threads", "1", "--sequence-length", "16",
        "--layers", "2", "--rounds", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = LatencyTable.from_json(out.read_text())
    assert (table.key.threads, table.key.sequence_length, table.key.num_hidden_layers) == (1, 16, 2)
    assert table.meta["source"] == "measured" and table.meta["rounds"] == 1
    assert "dense model:" in result.output and "trusted:" in result.output
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    config.num_hidden_layers = 2
    read = read_table_file(out, config, runtime="onnxruntime", threads=1, sequence_length=16)
    assert read.to_json() == table.to_json()


def test_latency_table_names_a_folder_without_a_model(tmp_path):
    result = _obert("latency-table", str(tmp_path / "nothing"), "--output", str(tmp_path / "t.json"))
    assert result.returncode == 1 and result.stderr.startswith("error: obert latency-table: cannot read")
    assert str(tmp_path / "nothing") in result.stderr and not (tmp_path / "t.json").exists()
