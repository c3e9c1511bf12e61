#!/usr/bin/env bash
# The test suite against real services (called by `make test`, which creates .venv first).
#
# CDP_KAFKA_BOOTSTRAP and CDP_POSTGRES_DSN both set: those services are used as they are.
# Otherwise scripts/services.sh starts (or reuses) a local Kafka and PostgreSQL; the ones this run
# started are stopped again at the end, ones that were already running are left running.
# Without Java, Kafka cannot run: with CI=true that is an error, elsewhere a warning, and the
# Kafka tests skip with a reason. Extra arguments go to pytest.
#
# The files run in parallel, CDP_TEST_WORKERS of them at a time (default 3; 0 runs them in this
# process): pytest-xdist with `--dist loadfile`, so a file's tests and module fixtures stay in one
# worker. Most tests wait on subprocesses, sockets and the services, so 3 workers pay off on 2 cores.
# Every run prints its 25 slowest tests.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
STATE="${CDP_SERVICES_DIR:-$REPO/.services}"
PYTEST="$REPO/.venv/bin/pytest"

say() { printf '[test] %s\n' "$*" >&2; }
in_ci() { [[ "${CI:-}" == "true" ]]; }

[[ -x "$PYTEST" ]] || { say "ERROR: $PYTEST not found: run 'make test' (it creates .venv)"; exit 1; }

# The report test opens the HTML report in a real headless Chromium (Debian's package).
if [[ ! -x /usr/bin/chromium ]] && ! command -v chromium >/dev/null; then
    say "installing chromium for the report test"
    if command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        apt-get install -y chromium >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; } \
            || say "WARNING: could not install chromium: the report test will be skipped"
    else
        say "WARNING: chromium missing and apt-get unusable (not root?): the report test will be skipped"
    fi
fi

STOP_AT_EXIT=()
stop_started() {
    if ((${#STOP_AT_EXIT[@]})); then
        say "stopping the services this run started: ${STOP_AT_EXIT[*]}"
        scripts/services.sh stop "${STOP_AT_EXIT[@]}" || say "WARNING: stopping the services failed"
    fi
}
trap stop_started EXIT

start_services() { # start_services [SERVICE…]; returns services.sh's exit code
    local rc=0
    scripts/services.sh start "$@" >/dev/null || rc=$?
    local s
    if [[ -f "$STATE/last-start" ]]; then
        while read -r s; do if [[ -n "$s" ]]; then STOP_AT_EXIT+=("$s"); fi; done <"$STATE/last-start"
    fi
    if ((rc == 0)); then
        local given_kafka="${CDP_KAFKA_BOOTSTRAP:-}" given_pg="${CDP_POSTGRES_DSN:-}"
        # shellcheck source=/dev/null
        source "$STATE/env.sh"
        # a variable the caller set wins over the local service
        if [[ -n "$given_kafka" ]]; then export CDP_KAFKA_BOOTSTRAP="$given_kafka"; fi
        if [[ -n "$given_pg" ]]; then export CDP_POSTGRES_DSN="$given_pg"; fi
    fi
    return "$rc"
}

if [[ -n "${CDP_KAFKA_BOOTSTRAP:-}" && -n "${CDP_POSTGRES_DSN:-}" ]]; then
    say "using the given services: CDP_KAFKA_BOOTSTRAP=$CDP_KAFKA_BOOTSTRAP CDP_POSTGRES_DSN=$CDP_POSTGRES_DSN"
else
    rc=0
    start_services || rc=$?
    if ((rc == 3)); then
        if in_ci; then
            say "ERROR: Kafka cannot run here (Java is missing, see above) and CI=true: the Kafka tests must not be skipped in CI"
            exit 1
        fi
        say "WARNING: Java is missing, so there is no Kafka: the Kafka tests will be SKIPPED. Install Java 17 to run them."
        rc=0
        start_services postgres || rc=$?
    fi
    if ((rc != 0)); then
        say "ERROR: the test services did not start (scripts/services.sh exit code $rc, see above)"
        exit 1
    fi
    say "services: CDP_KAFKA_BOOTSTRAP=${CDP_KAFKA_BOOTSTRAP:-<none>} CDP_POSTGRES_DSN=${CDP_POSTGRES_DSN:-<none>}"
fi

if [[ -n "${CDP_KAFKA_BOOTSTRAP:-}" ]] && ! command -v kcat >/dev/null; then
    # the Kafka tests publish and read with kcat too; CI starts from a bare machine
    scripts/services.sh kcat || { in_ci && { say "ERROR: kcat could not be installed and CI=true"; exit 1; }
                                  say "WARNING: kcat could not be installed: its test will be skipped"; }
fi

WORKERS="${CDP_TEST_WORKERS:-3}"
[[ "$WORKERS" =~ ^[0-9]+$ ]] || { say "ERROR: CDP_TEST_WORKERS must be a number of workers (0: no parallel run), not '$WORKERS'"; exit 2; }
PARALLEL=()
if ((WORKERS > 0)); then PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder); fi

status=0
"$PYTEST" -q -ra --durations=25 "${PARALLEL[@]}" "$@" || status=$?
if ((status == 5)); then
    say "ERROR: pytest collected no tests (exit code 5): check testpaths in pyproject.toml and the arguments given"
    exit 5
fi
exit "$status"
