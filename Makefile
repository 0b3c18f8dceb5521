# The two commands of the README: `make demo` and `make test`. Both set the host up first.
PY := .venv/bin/python

.PHONY: setup demo test unit bench guest clean mutation

setup:
	./scripts/setup-host

guest:
	$(MAKE) -C lab/guest

demo: setup guest
	$(PY) -m agent.demo

# Both print the branch coverage of agent/ (pyproject.toml [tool.coverage.*]); the exit status is pytest's.
test: setup guest
	@mkdir -p build/coverage
	$(PY) -m coverage run -m pytest; status=$$?; $(PY) -m coverage report; exit $$status

unit:
	@mkdir -p build/coverage
	$(PY) -m coverage run -m pytest tests/unit; status=$$?; $(PY) -m coverage report; exit $$status

# mutation testing of the correlation core (docs/testing.md, "Mutation testing"; 6-18 min on 2 cores)
MUTMUT_VERSION := 3.8.1
mutation: setup
	@$(PY) -m pip show mutmut 2>/dev/null | grep -qx 'Version: $(MUTMUT_VERSION)' || \
		$(PY) -m pip install -q 'mutmut==$(MUTMUT_VERSION)'
	./scripts/mutation

# every benchmark in turn (root, KVM, BCC; ~8 min): docs/benchmarks.md
bench: setup guest
	$(PY) -m bench

clean:
	$(MAKE) -C lab/guest clean
	rm -rf .venv .pytest_cache build/coverage build/mutation
