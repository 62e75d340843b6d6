#!/usr/bin/env bash
# Mutation testing of one core module with mutmut (dev extra), against the fast tests that cover it.
#   bash scripts/mutation.sh layers/lora            # mutate src/mole/layers/lora.py, run its test subset
#   bash scripts/mutation.sh layers/lora --show     # after a run: the diff of every surviving mutant
#   bash scripts/mutation.sh layers/lora --alive    # after adding tests: retest only the mutants left alive
#   bash scripts/mutation.sh layers/mole_layer --sample 4   # a big module: every 4th mutant only (an estimate)
#   bash scripts/mutation.sh --list                 # the modules and their test subsets
# Each module works in its own scratch folder .mutation/<module>/ (git-ignored), so results are cached there and
# a rerun keeps earlier verdicts (--alive retests the survivors); `rm -rf .mutation/<module>` starts afresh.
# Environment: MUTATION_JOBS (parallel mutants, default 1), MUTATION_TIMEOUT_X (per-mutant timeout as a multiple
# of the covering tests' clean run time, default 5; a mutant past it counts as killed, "timeout").
# Not run in CI: a module takes minutes to tens of minutes on 2 cores (docs/testing.md has the timings).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

# module (path under src/mole, no .py) -> the smallest test files that exercise it
declare -A TESTS=(
  [layers/lora]="tests/test_layer.py tests/test_locon.py tests/test_mutation_kills.py"
  [layers/gates]="tests/test_layer.py tests/test_gate_seed.py tests/test_silent_bugs.py tests/test_mutation_kills.py"
  [layers/mole_layer]="tests/test_layer.py tests/test_gate_seed.py tests/test_instruct.py tests/test_recording.py tests/test_mutation_kills.py"
  [layers/fused]="tests/test_layer.py tests/test_mutation_kills.py"
  [layers/spatial]="tests/test_locon.py tests/test_mutation_kills.py"
  [training/loss]="tests/test_training_parts.py tests/test_mutation_kills.py"
  [training/stages]="tests/test_training.py"
  [formats/kohya]="tests/test_experts.py tests/test_silent_bugs.py tests/test_io.py tests/test_locon.py tests/test_mutation_kills.py"
  [formats/diffusers]="tests/test_experts.py tests/test_silent_bugs.py tests/test_mutation_kills.py"
  [formats/lora]="tests/test_experts.py tests/test_io.py"
  [formats/common]="tests/test_experts.py tests/test_io.py"
  [formats/mole_file]="tests/test_io.py"
  [experts]="tests/test_experts.py"
  [recording]="tests/test_recording.py"
  [eval/metrics]="tests/test_eval.py"
)

if [[ "${1:-}" == "--list" || $# -eq 0 ]]; then
  for m in $(printf '%s\n' "${!TESTS[@]}" | sort); do printf '%-20s %s\n' "$m" "${TESTS[$m]}"; done
  exit 0
fi
MOD="$1"; shift
if [[ -z "${TESTS[$MOD]+x}" ]]; then
  echo "unknown module '$MOD': choose one of: $(printf '%s ' "${!TESTS[@]}" | tr ' ' '\n' | sort | tr '\n' ' ')" >&2
  exit 2
fi
SRC="src/mole/$MOD.py"
[[ -f "$SRC" ]] || { echo "$SRC does not exist" >&2; exit 2; }
MUTMUT="$ROOT/.venv/bin/mutmut"
[[ -x "$MUTMUT" ]] || { echo "mutmut is not installed: .venv/bin/pip install -e '.[dev]'" >&2; exit 2; }

WORK="$ROOT/.mutation/${MOD//\//.}"
mkdir -p "$WORK"
ln -sfn "$ROOT/src" "$WORK/src"
for d in tests configs examples docs README.md; do ln -sfn "$ROOT/$d" "$WORK/$d"; done
# tests/conftest.py finds the shared data two folders above itself: mutants/tests -> $WORK/shared
ln -sfn "$(cd "$ROOT/.." && pwd)/shared" "$WORK/shared"

toml_list() { local out="" x; for x in "$@"; do [[ -f "$ROOT/$x" ]] && out+="\"$x\", "; done; echo "[${out%, }]"; }
# shellcheck disable=SC2086
cat > "$WORK/pyproject.toml" <<EOF
# written by scripts/mutation.sh for $SRC; edit the script, not this file
[tool.mutmut]
source_paths = ["src"]
also_copy = ["configs", "examples", "docs", "README.md"]
only_mutate = ["$SRC"]
pytest_add_cli_args_test_selection = $(toml_list ${TESTS[$MOD]})
# mutmut's trampolines are Python calls torch.compile cannot trace: the no-graph-break test stays out of the runs
pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-k", "not compiles_without_graph_breaks"]
process_isolation = "forkserver"
timeout_multiplier = ${MUTATION_TIMEOUT_X:-5}
timeout_constant = 10.0
use_git_change_detection = false

[tool.pytest.ini_options]
addopts = "-ra"
EOF

cd "$WORK"
if [[ "${1:-}" == "--show" ]]; then
  for m in $("$MUTMUT" results 2>/dev/null | awk -F: '/: survived|: no tests/ {print $1}'); do "$MUTMUT" show "$m"; echo; done
  exit 0
fi
names=()
if [[ "${1:-}" == "--alive" ]]; then  # after adding tests: retest only the mutants the last run left alive
  shift
  [[ -f results.txt ]] || { echo "no earlier run of $MOD to retest: run without --alive first" >&2; exit 2; }
  mapfile -t names < <(awk -F': ' '$2 != "killed" && $2 != "timeout" && $2 != "not checked" {gsub(/ /, "", $1); print $1}' results.txt)
  [[ ${#names[@]} -gt 0 ]] || { echo "$MOD: no mutant left alive"; exit 0; }
  rm -f mutants/mutmut-stats.json  # new tests must be mapped to the functions they reach
fi
if [[ "${1:-}" == "--sample" ]]; then  # a big module on 2 cores: test every K-th mutant (an estimate, said so)
  K="${2:?--sample needs K: every K-th mutant is tested}"; shift 2
  meta="mutants/$SRC.meta"
  if [[ ! -f "$meta" ]]; then  # generate the mutants (and test the first one of each function)
    nice -n 19 "$MUTMUT" run --max-children "${MUTATION_JOBS:-1}" "mole.${MOD//\//.}.*__mutmut_1" \
      | tr '\r' '\n' | grep --line-buffered -v -E '^(⠋|⠙|⠹|⠸|⠼|⠴|⠦|⠧|⠇|⠏)' || true
  fi
  mapfile -t names < <(python3 - "$meta" "$K" <<'EOF'
import json, re, sys
keys = json.load(open(sys.argv[1]))["exit_code_by_key"]
order = sorted(keys, key=lambda k: (k.rsplit("__mutmut_", 1)[0], int(k.rsplit("__mutmut_", 1)[1])))
print("\n".join(order[:: int(sys.argv[2])]))
EOF
)
  echo "sampling ${#names[@]} mutants (every $K-th)"
fi
start=$(date +%s)
set +e
nice -n 19 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$MUTMUT" run --max-children "${MUTATION_JOBS:-1}" "$@" "${names[@]}" \
  | tr '\r' '\n' | grep --line-buffered -v -E '^(⠋|⠙|⠹|⠸|⠼|⠴|⠦|⠧|⠇|⠏)'
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 0 ]] || { echo "mutmut run failed (exit $rc); see the output above" >&2; exit "$rc"; }
elapsed=$(( $(date +%s) - start ))
"$MUTMUT" results --all true > results.txt 2>/dev/null || "$MUTMUT" results > results.txt
python3 - "$MOD" "$elapsed" results.txt <<'EOF'
import collections, sys
mod, elapsed, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
status = dict(line.strip().rsplit(": ", 1) for line in open(path) if ": " in line)
unchecked = [k for k, v in status.items() if v == "not checked"]  # outside a --sample
status = {k: v for k, v in status.items() if v != "not checked"}
counts = collections.Counter(status.values())
total = len(status)
killed = counts["killed"] + counts["timeout"]  # a mutant that hangs the tests is caught
alive = sorted(name for name, s in status.items() if s not in ("killed", "timeout"))
print("\n".join(f"  {name}: {status[name]}" for name in alive))
print(f"{mod}: {total} mutants, {killed} killed, {len(alive)} not killed ({100.0 * len(alive) / max(total, 1):.1f} %: "
      f"{dict(c for c in counts.items() if c[0] not in ('killed', 'timeout'))}); {elapsed} s"
      + (f"; {len(unchecked)} more not checked (sampled run)" if unchecked else ""))
EOF
