# converge: the two commands are `make demo` and `make test`.
CARGO ?= cargo

.PHONY: setup build test check fuzz demo demo-stop bench failover-bench torture sim clean

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

# The deterministic simulator over many seeds; prints seeds per second and what the seeds
# did. `make test` runs a bounded number of seeds.
SEEDS ?= 10000
sim:
	$(CARGO) run --release -p sim -- $(SEEDS)

# Many fault cycles on real processes (3 and 5 nodes); prints cycles, faults, writes and
# anomalies. `make test` runs a short version of the same tests.
CYCLES ?= 20
torture: setup
	CONVERGE_TORTURE_CYCLES=$(CYCLES) $(CARGO) test --release -p converge --test torture -- --nocapture --test-threads 1

demo: build
	@scripts/demo.sh

demo-stop:
	@scripts/demo.sh stop

bench: build
	@scripts/bench-import.sh
	@scripts/bench-vm.sh
	@cargo run --release -q -p volume --example transport_cost

# SIGKILL of a VM's node until its guest boots elsewhere, split into detection, decision,
# fencing and boot, against a cold start of the same VM. RUNS=N runs (default 3).
failover-bench: build
	@scripts/bench-failover.sh

clean:
	$(CARGO) clean
	rm -rf demo
