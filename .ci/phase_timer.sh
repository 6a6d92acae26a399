# Wall time of a CI script's phases. Source it after setting PHASE_TAG; call `phase_done "<what>"` at the end of
# each phase, and `seconds_since "$START"` for the total.
START=$EPOCHREALTIME
PHASE_START=$START
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
phase_done() {
  printf '==> %s: %-44s %7s s\n' "$PHASE_TAG" "$1" "$(seconds_since "$PHASE_START")"
  PHASE_START=$EPOCHREALTIME
}
