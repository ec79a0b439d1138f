#!/usr/bin/env bash
# Install a single-host Slurm (controller, node daemon, clients) and munge for the Slurm
# integration test (tests/test_slurm.py).
#
# CI-safe by design: it never fails the CI run. Where apt-get is absent, where we are not root,
# or where the install fails (no network, other distribution), it says why and exits 0; the
# Slurm tests then skip with that reason. Idempotent: a second run with everything present
# returns at once without touching apt.
set -uo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client munge)
readonly COMMANDS=(slurmctld slurmd sbatch srun scontrol squeue munged mungekey)

missing=()
for cmd in "${COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if ((${#missing[@]} == 0)); then
    echo "install_slurm: Slurm and munge already installed"
    exit 0
fi

skip() { echo "install_slurm: $*; the Slurm tests will be skipped" >&2; exit 0; }

command -v apt-get >/dev/null 2>&1 || skip "apt-get not found (missing: ${missing[*]})"
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        skip "not root and no password-less sudo (missing: ${missing[*]})"
    fi
else
    SUDO=()
fi

# The packages' own services stay unused (and in containers policy-rc.d stops them starting):
# the test starts private daemons with configs, keys and sockets in a temporary folder.
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq || skip "apt-get update failed"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" \
    || skip "apt-get install ${PACKAGES[*]} failed"
echo "install_slurm: installed ${PACKAGES[*]}"
