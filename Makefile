# The two commands of the README: `make demo` and `make test`. Both set the host up first.
PY := .venv/bin/python

.PHONY: setup demo test unit bench guest clean

setup:
	./scripts/setup-host

guest:
	$(MAKE) -C lab/guest

demo: setup guest
	$(PY) -m agent.demo

test: setup guest
	$(PY) -m pytest

unit:
	$(PY) -m pytest tests/unit

# every benchmark in turn (root, KVM, BCC; ~8 min): docs/benchmarks.md
bench: setup guest
	$(PY) -m bench

clean:
	$(MAKE) -C lab/guest clean
	rm -rf .venv .pytest_cache
