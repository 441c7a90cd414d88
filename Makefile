# converge: the two commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: setup build test check demo demo-stop bench clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --bin converge

# The read-only gate: formatting, lints.
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: setup check
	scripts/test.sh

demo: build
	@scripts/demo.sh

demo-stop:
	@scripts/demo.sh stop

bench: build
	@scripts/bench-import.sh

clean:
	$(CARGO) clean
	rm -rf demo
