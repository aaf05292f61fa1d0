# Two commands matter on a fresh machine: `make demo` and `make test`. Both install first when needed.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := .demo

export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-slow test-full lint clean-demo

# Reinstall only when the package metadata changes (the install is editable, so code edits need none).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

test-full: install
	$(BIN)/pytest -q -m ""

lint: install
	$(BIN)/ruff check src tests scripts

demo: install
	bash scripts/demo.sh $(DEMO)

clean-demo:
	rm -rf $(DEMO)
