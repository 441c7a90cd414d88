# converge: the two commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: setup build test check fuzz demo demo-stop bench clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --bin converge

# The read-only gate: formatting, lints.
check:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Fuzz targets run for a bounded time first; the suite's summary line comes last.
fuzz: setup
	scripts/fuzz.sh

test: setup check fuzz
	scripts/test.sh

demo: build
	@scripts/demo.sh

demo-stop:
	@scripts/demo.sh stop

bench: build
	@scripts/bench-import.sh
	@scripts/bench-vm.sh

clean:
	$(CARGO) clean
	rm -rf demo
