# The two commands of the README: `make demo` and `make test`. Both set the host up first.
PY := .venv/bin/python

.PHONY: setup demo test unit guest clean

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

clean:
	$(MAKE) -C lab/guest clean
	rm -rf .venv .pytest_cache
