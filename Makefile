# Quick start: `make demo` runs the whole pipeline on generated data; `make test` runs the tests.
# Both install what they need first (libtorch from the registry's torch wheel, into .libtorch/;
# ONNX Runtime's library from the registry's onnxruntime wheel, into .onnxruntime/).
CARGO ?= cargo
LIBTORCH_STAMP := .libtorch/installed
ORT_STAMP := .onnxruntime/installed

.PHONY: all setup build demo test lint fmt bench install clean

all: build

setup: $(LIBTORCH_STAMP) $(ORT_STAMP)

$(LIBTORCH_STAMP): scripts/setup-libtorch.sh
	bash scripts/setup-libtorch.sh

# The CPU build; on a GPU machine: `bash scripts/setup-onnxruntime.sh --gpu`.
$(ORT_STAMP): scripts/setup-onnxruntime.sh
	bash scripts/setup-onnxruntime.sh

build: setup
	$(CARGO) build --release

demo: build
	target/release/evald demo

test: setup
	bash scripts/test-deps.sh
	$(CARGO) test --all-targets

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	bash scripts/bench.sh

# After `make build` as yourself: `sudo make install` (README, "Administration").
install:
	bash scripts/install.sh

clean:
	$(CARGO) clean
