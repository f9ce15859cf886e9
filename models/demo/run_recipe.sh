#!/usr/bin/env bash
# The demo recipe end to end, in resumable chunks of at most 2 hours (docs/DEMO_MODEL.md, "Recipe").
#
#   nice -n 19 bash models/demo/run_recipe.sh STATE_DIR &
#
# STATE_DIR holds everything (corpus/, demo/, driver.log) and two small settings files, read when
# each chunk starts (edit them before a stage begins, never during one):
#   STATE_DIR/corpus.args   arguments of `python -m fastslm.models.demo.corpus`
#   STATE_DIR/recipe.args   arguments of `python -m fastslm.models.demo` (every stage)
# Missing ones are written with the defaults below. Rerunning the same command after any stop
# (kill, reboot, session end) resumes: every stage skips or resumes finished work, and a stage
# that finished is marked in STATE_DIR/done.<stage>. Each chunk is stopped with SIGTERM after
# CHUNK_SECONDS (training then checkpoints) and started again; a chunk that fails (exit code
# other than 0 or 124) stops the driver, with the reason in driver.log.
# While a chunk runs, STATE/.chunk holds its wall and CPU seconds so far (every TICK_SECONDS, 30): when the
# driver itself is killed (a session's end kills everything), the next start adds that reading to
# STATE/seconds.<stage>, so the recipe's time survives the stop.
# The whole body is one function, so editing this file never changes a driver already running.

children_cpu() {  # user + system CPU seconds of every finished child of this shell so far -> $cpu
    times >"$1/.times"  # in this shell: `times` in a $(...) subshell would count only the subshell's children
    cpu=$(awk 'NR == 2 { n = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); n += p[1] * 60 + p[2] } printf "%d", n }' "$1/.times")
}

tree_cpu() {  # CPU seconds so far of process $1 and all its descendants (their reaped children included) -> stdout
    # /proc/PID/stat after "(comm) ": field 2 is the parent, 12-15 are utime, stime, cutime, cstime in clock ticks
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$1" -v hz="$(getconf CLK_TCK)" '
        { pid = $1; line = $0; sub(/^.*\) /, "", line); split(line, f, " "); parent[pid] = f[2]
          ticks[pid] = f[12] + f[13] + f[14] + f[15] }
        END {
            inside[root] = 1; grown = 1
            while (grown) { grown = 0; for (p in parent) if (!(p in inside) && (parent[p] in inside)) { inside[p] = 1; grown = 1 } }
            for (p in inside) total += ticks[p]
            printf "%d\n", total / hz
        }'
}

main() {
    set -u
    local state python chunk tick stage rc t0 cpu cpu0 cpu1 child wall i
    state=$(realpath -m "${1:?usage: run_recipe.sh STATE_DIR}")
    python=${PYTHON:-python}
    chunk=${CHUNK_SECONDS:-7200}
    tick=${TICK_SECONDS:-30}
    # the eval stage scores jfk.flac, the one real recording: the repository's ../shared/data unless set
    if [ -z "${FASTSLM_SHARED_DATA:-}" ] && [ -f "$(dirname "$0")/../../../shared/data/jfk.flac" ]; then
        FASTSLM_SHARED_DATA=$(realpath "$(dirname "$0")/../../../shared/data")
        export FASTSLM_SHARED_DATA
    fi
    mkdir -p "$state"
    exec >>"$state/driver.log" 2>&1
    echo "== $(date -u +%FT%TZ) driver start (pid $$, python $python, PYTHONPATH ${PYTHONPATH:-}," \
        "FASTSLM_SHARED_DATA ${FASTSLM_SHARED_DATA:-unset})"
    if [ -f "$state/.chunk" ]; then  # the last driver was killed during this chunk: keep its last reading
        read -r stage wall cpu <"$state/.chunk"
        echo "$wall $cpu" >>"$state/seconds.$stage"
        echo "-- $(date -u +%FT%TZ) $stage: the chunk before was killed with its driver; its last reading," \
            "$wall s wall and CPU $cpu s, added to seconds.$stage"
        rm -f "$state/.chunk"
    fi
    [ -f "$state/corpus.args" ] || echo "--seed 0 --mix wide --train-utterances 32000 --jobs 2" >"$state/corpus.args"
    # the defaults are the shipped model's settings (docs/DEMO_MODEL.md, "The 12-hour run")
    [ -f "$state/recipe.args" ] || echo "--seed 0 --bf16 --threads 2 --no-progress --slot-timing whisper --passes 1.25" \
        "--steps 8000 --warmup-steps 500 --eval-every 400 --spec-prob 0.8 --spec-time-masks 3 --spec-time-frames 12" \
        "--spec-channel-masks 2 --spec-channel-width 32 --spec-speech-only --select-qa-weight 0.5 --reading-qa 8" \
        "--qa-weight 4 --qa-from 2000 --qa-think-from 3200 --reading-qa-from 4480:24 --ema-decay 0.998" \
        "--ema-from 4000 --summary-scratch-from 3200 --reading-qa-types-from 4480:summary=2,count=1.5" \
        "--tune-encoder-blocks 1 --encoder-lr-scale 0.1" >"$state/recipe.args"
    for stage in corpus tokenizer windows features align train export-folder eval bundle eval-bundle; do
        while [ ! -f "$state/done.$stage" ]; do
            t0=$(date +%s)
            children_cpu "$state"; cpu0=$cpu
            echo "-- $(date -u +%FT%TZ) $stage: chunk start"
            if [ "$stage" = corpus ]; then
                # shellcheck disable=SC2046
                timeout -s TERM "$chunk" "$python" -m fastslm.models.demo.corpus --out "$state/corpus" \
                    $(cat "$state/corpus.args") </dev/null &
            else
                # shellcheck disable=SC2046
                timeout -s TERM "$chunk" "$python" -m fastslm.models.demo --work "$state/demo" \
                    --corpus "$state/corpus" --stage "$stage" $(cat "$state/recipe.args") </dev/null &
            fi
            child=$!
            while kill -0 "$child" 2>/dev/null; do
                echo "$stage $(( $(date +%s) - t0 )) $(tree_cpu "$child")" >"$state/.chunk.new"
                mv -f "$state/.chunk.new" "$state/.chunk"
                for ((i = 0; i < tick; i++)); do kill -0 "$child" 2>/dev/null || break; sleep 1; done
            done
            wait "$child"
            rc=$?
            rm -f "$state/.chunk"
            children_cpu "$state"; cpu1=$cpu
            echo "-- $(date -u +%FT%TZ) $stage: chunk end rc=$rc after $(( $(date +%s) - t0 )) s, CPU $((cpu1 - cpu0)) s"
            # one line per chunk: wall and CPU seconds (on a shared machine the CPU seconds are the recipe's cost)
            echo "$(( $(date +%s) - t0 )) $((cpu1 - cpu0))" >>"$state/seconds.$stage"
            if [ $rc -eq 0 ]; then
                if [ "$stage" = train ] && ! grep -q "^train: finished" "$state/driver.log"; then
                    continue  # stopped by a signal before the end of the schedule: resume
                fi
                touch "$state/done.$stage"
            elif [ $rc -ne 124 ]; then  # 124: the chunk ran its full time; resume
                echo "== $(date -u +%FT%TZ) driver stops: $stage failed (rc $rc); fix it and rerun the command"
                return 1
            fi
        done
    done
    echo "== $(date -u +%FT%TZ) recipe done: model in $state/demo/model, its INT8 default in" \
        "$state/demo/bundle-int8, numbers in $state/demo/eval.json and eval_bundles.json"
}

main "$@"
