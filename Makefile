# Quick start: `make demo` runs the whole pipeline on generated data; `make test` runs the tests.
# Both install what they need first (libtorch from the registry's torch wheel, into .libtorch/).
CARGO ?= cargo
LIBTORCH_STAMP := .libtorch/installed

.PHONY: all setup build demo test lint fmt bench install clean

all: build

setup: $(LIBTORCH_STAMP)

$(LIBTORCH_STAMP): scripts/setup-libtorch.sh
	bash scripts/setup-libtorch.sh

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
