#!/usr/bin/env bash
# Nightly benchmark launcher: the command of the CronJob in k8s/bench-nightly-cronjob.yaml
# (image registry.k8s.io/kubectl, which ships bash and jq). It
#   1. creates one RayJob from the template $RAYJOB_TEMPLATE (JSON, same ConfigMap), named
#      <this pod's Job>-ray and owned by that Job (so Kubernetes deletes it with the Job even if
#      this pod is killed);
#   2. watches .status.jobDeploymentStatus (cluster and submission: Initializing, Running,
#      Retrying, Complete, Failed, ValidationFailed) and .status.jobStatus (the Ray job);
#   3. relays the outcome and the last lines of the job's log, then deletes the RayJob.
# API reads are retried: one failed `kubectl get` (API server restart, throttling, network
# blip) must not end the watch while the RayJob keeps running.
#
# Exit status (what the CronJob's Job history and alerting see):
#   0  suite ran, no regression -- including the first night, when `distreg bench compare`
#      has no baseline yet and exits 0 with a note (relayed as NOTE below)
#   1  regression (`distreg bench compare` exited 1)
#   2  the suite or its comparison was misused (`distreg bench` exited 2)
#   3  the RayJob failed otherwise: cluster never ready, submission failed, deadline, stopped
#   4  the Kubernetes API stayed unreachable for API_GRACE_SECONDS
#   5  the RayJob could not be created
#   143 terminated (deadline of the CronJob's Job, node drain); the RayJob is deleted first
set -euo pipefail

TEMPLATE=${RAYJOB_TEMPLATE:-/etc/distreg-bench/rayjob.json}
POLL_SECONDS=${POLL_SECONDS:-60}
API_GRACE_SECONDS=${API_GRACE_SECONDS:-900}   # how long API reads may keep failing
BACKOFF_SECONDS=${BACKOFF_SECONDS:-2}          # first retry delay; doubles up to 60 s
LOG_LINES=${LOG_LINES:-200}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-30s}        # per call: a hung connection counts as a failure
JOB_NAME=${JOB_NAME:-}                         # downward API: this pod's Job
JOB_UID=${JOB_UID:-}

# To stderr: `kube` runs inside $(...), whose stdout is the answer it returns.
log() { printf '%s bench-nightly: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# kubectl with retries for reads and idempotent calls. Prints stdout on success. An
# answer that retrying cannot change (NotFound, Forbidden...) returns 2 at once; anything
# else (timeouts, 5xx, connection refused) is retried with backoff, and returns 1 once
# the API has failed for API_GRACE_SECONDS in a row.
kube() {
  local started=$SECONDS delay=$BACKOFF_SECONDS out err
  err=$(mktemp)
  while :; do
    if out=$(kubectl "$@" --request-timeout="$REQUEST_TIMEOUT" 2>"$err"); then
      rm -f "$err"
      printf '%s' "$out"
      return 0
    fi
    log "kubectl $1 failed: $(tr '\n' ' ' <"$err" | cut -c1-300)"
    if grep -qE '\((NotFound|Forbidden|Unauthorized|Invalid|BadRequest)\)' "$err"; then
      rm -f "$err"
      return 2
    fi
    if (( SECONDS - started >= API_GRACE_SECONDS )); then
      rm -f "$err"
      return 1
    fi
    sleep "$delay" & wait $!   # in the background: a TERM is handled at once
    delay=$(( delay * 2 > 60 ? 60 : delay * 2 ))
  done
}

# Not the Job's own name: KubeRay names its submitter Job after the RayJob, and would
# take this launcher's Job for it.
name=${JOB_NAME:-distreg-bench-nightly-$(date -u +%Y%m%d%H%M)}-ray
created=""

cleanup() {
  [[ -n $created ]] || return 0
  if API_GRACE_SECONDS=60 kube delete rayjob "$name" --ignore-not-found --wait=false >/dev/null; then
    log "deleted RayJob $name"
  else
    log "could not delete RayJob $name; it is owned by Job $JOB_NAME and goes with it"
  fi
  created=""
}
trap 'log "terminated"; cleanup; exit 143' TERM INT

# ---- 1. create ------------------------------------------------------------------------
manifest=$(jq --arg name "$name" --arg job "$JOB_NAME" --arg uid "$JOB_UID" '
  .metadata.name = $name
  | .metadata.labels["distreg.io/launched-by"] = "bench-nightly"
  | if $uid != "" then .metadata.ownerReferences = [
      {apiVersion: "batch/v1", kind: "Job", name: $job, uid: $uid}] else . end' "$TEMPLATE")
create_err=$(mktemp)
if ! printf '%s' "$manifest" | kubectl create -f - --request-timeout="$REQUEST_TIMEOUT" >/dev/null 2>"$create_err"; then
  # The create may have reached the API server before the error: the name is ours
  # (our Job's), so an existing RayJob of that name is the one we asked for.
  if kube get rayjob "$name" -o name >/dev/null; then
    log "RayJob $name already exists (an earlier create got through); watching it"
  else
    log "could not create RayJob $name: $(tr '\n' ' ' <"$create_err" | cut -c1-300)"
    exit 5
  fi
fi
created=1
log "created RayJob $name"

# ---- 2. watch -------------------------------------------------------------------------
last=""
while :; do
  read_status=0
  state=$(kube get rayjob "$name" -o 'jsonpath={.status.jobDeploymentStatus}{"/"}{.status.jobStatus}{"/"}{.status.reason}') || read_status=$?
  if (( read_status == 2 )); then
    log "RayJob $name can no longer be read (deleted by someone else, or RBAC changed)"
    created=""
    exit 3
  elif (( read_status != 0 )); then
    log "Kubernetes API unreachable for ${API_GRACE_SECONDS}s; RayJob $name is left to KubeRay (its activeDeadlineSeconds bounds it)"
    exit 4
  fi
  IFS=/ read -r deployment job reason <<<"$state" || true
  if [[ $state != "$last" ]]; then
    log "RayJob $name: deployment=${deployment:-New} job=${job:-none}${reason:+ reason=$reason}"
    last=$state
  fi
  case $deployment in
    Complete|Failed|ValidationFailed) break ;;
  esac
  sleep "$POLL_SECONDS" & wait $!
done

# ---- 3. outcome -----------------------------------------------------------------------
message=$(kube get rayjob "$name" -o 'jsonpath={.status.message}' || true)
logs=$(API_GRACE_SECONDS=120 kube logs "job/$name" --tail="$LOG_LINES" || true)
if [[ -n $logs ]]; then
  printf '%s\n' "----- last $LOG_LINES lines of RayJob $name -----" "$logs" "-----"
fi

# Ray reports a failed entrypoint as "Job entrypoint command failed with exit code N, ...".
exit_code=$(printf '%s' "$message" | sed -n 's/.*failed with exit code \([0-9][0-9]*\).*/\1/p' | head -n1)
rc=3
if [[ $deployment == Complete && $job == SUCCEEDED ]]; then
  rc=0
  if grep -qi 'no baseline' <<<"$logs"; then
    log "NOTE: no baseline yet for this suite (first night): results recorded, nothing compared"
  fi
  log "RayJob $name succeeded"
elif [[ $exit_code == 1 ]]; then
  rc=1
  log "REGRESSION: distreg bench compare exited 1 (see the table above)"
elif [[ $exit_code == 2 ]]; then
  rc=2
  log "distreg bench exited 2 (usage or suite error): $(printf '%s' "$message" | head -n1)"
else
  log "RayJob $name failed: deployment=${deployment} job=${job:-none} reason=${reason:-none}: $(printf '%s' "$message" | head -n1)"
fi
cleanup
exit "$rc"
