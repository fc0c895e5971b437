# Sourced by eval/scienceqa.sh and eval/llavabench.sh: answer a question file in NUM_CHUNKS parallel chunks (one
# per GPU in GPULIST, LLaVA's layout ANSWER_DIR/{NUM_CHUNKS}_{IDX}.jsonl), then merge them into
# ANSWER_DIR/merge.jsonl. Unlike LLaVA's scripts, a failed chunk stops the script instead of scoring a partial
# merge; a rerun resumes every chunk.
# Generation settings are LLaVA's for BENCHMARK (drip_llava.eval.generate --benchmark: temperature 0, 1024 new
# tokens, one beam, vicuna_v1); CONV_MODE, TEMPERATURE, MAX_NEW_TOKENS, TOP_P, NUM_BEAMS override them when set.
#   uses: PYTHON, MODEL_PATH, BASE_ARGS (array), BENCHMARK, GPUS (array), NUM_CHUNKS
#   generate_chunks QUESTION_FILE IMAGE_FOLDER ANSWER_DIR   -> sets MERGED
generate_chunks() {
    local questions="$1" images="$2" answer_dir="$3" idx pid failed=0
    local pids=() gen_args=(--benchmark "$BENCHMARK")
    if [[ -n "${CONV_MODE:-}" ]]; then gen_args+=(--conv-mode "$CONV_MODE"); fi
    if [[ -n "${TEMPERATURE:-}" ]]; then gen_args+=(--temperature "$TEMPERATURE"); fi
    if [[ -n "${MAX_NEW_TOKENS:-}" ]]; then gen_args+=(--max-new-tokens "$MAX_NEW_TOKENS"); fi
    if [[ -n "${TOP_P:-}" ]]; then gen_args+=(--top_p "$TOP_P"); fi
    if [[ -n "${NUM_BEAMS:-}" ]]; then gen_args+=(--num_beams "$NUM_BEAMS"); fi
    for idx in $(seq 0 $((NUM_CHUNKS - 1))); do
        CUDA_VISIBLE_DEVICES="${GPUS[$((idx % ${#GPUS[@]}))]}" "$PYTHON" -m drip_llava.eval.generate \
            --model-path "$MODEL_PATH" "${BASE_ARGS[@]}" \
            --question-file "$questions" \
            --image-folder "$images" \
            --answers-file "$answer_dir/${NUM_CHUNKS}_${idx}.jsonl" \
            --num-chunks "$NUM_CHUNKS" --chunk-idx "$idx" \
            "${gen_args[@]}" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    if (( failed )); then echo "error: a generation chunk failed (see above); rerun to resume" >&2; exit 1; fi

    MERGED="$answer_dir/merge.jsonl"
    : > "$MERGED"
    for idx in $(seq 0 $((NUM_CHUNKS - 1))); do
        if [[ -f "$answer_dir/${NUM_CHUNKS}_${idx}.jsonl" ]]; then cat "$answer_dir/${NUM_CHUNKS}_${idx}.jsonl" >> "$MERGED"; fi
    done
}
