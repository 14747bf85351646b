"""`smg mock-worker`: mock SGLang/vLLM HTTP workers for demos, benchmarks and tests.

    smg mock-worker --engine sglang --port 0 --count 3 --ttft-ms 50 --itl-ms 10

One process hosts `--count` workers on consecutive ports from `--port` (`--port 0`: one
ephemeral port each); each has its own listener, runtime config and stats. Once all are
listening it prints one `MOCK_WORKER_URL http://HOST:PORT` line per worker to stdout
(flushed); `tests/mockutil.py` starts workers that way. With `--ssl-certfile`/`--ssl-keyfile`
(vLLM's and uvicorn's names) every worker serves https only and the lines say `https://`;
`--ssl-ca-certs` with `--ssl-cert-reqs 2` demands a client certificate from that CA.

Routes (both engines): /health, /health_generate, /v1/models (owned_by "sglang"/"vllm"),
/metrics (the engine's Prometheus names), /v1/chat/completions, /v1/completions,
/generate (SGLang native; served by the vLLM mock too), /v1/embeddings, /v1/rerank,
/rerank, /flush_cache, POST /start_profile and /stop_profile (recorded in /mock/stats
"profile_events" with the inference count at the time; no profiler runs). SGLang only: /server_info, /get_server_info, /get_model_info,
/model_info, /v1/loads, /get_load. vLLM only: /version, /reset_prefix_cache.
Test control (never counted in stats, never behind --api-key): GET /mock/stats,
GET|POST /mock/config, POST /mock/reset.

Decisions:
- Tokens are whitespace-separated words (prompt: all message text; token-id prompts: the
  list length). Output is exactly min(max_tokens, output_len) tokens unless --eos-prob
  is set and the request lacks ignore_eos (see plan.py). max_tokens is read from
  max_completion_tokens / max_tokens (chat), max_tokens (completions) and
  sampling_params.max_new_tokens (/generate).
- Timing: a stream sends its headers at once, the role chunk with the first token at
  ttft, then one token every itl (deadline-based). A non-streaming answer comes after
  ttft + itl * (n - 1). Embeddings and rerank answer without delay. Per request,
  headers x-mock-ttft-ms / x-mock-itl-ms / x-mock-output-len override the config and
  x-mock-status: 4xx/5xx forces an error answer.
- --api-key: every route needs `Authorization: Bearer KEY` (401 otherwise) except
  /health and /health_generate, which real SGLang/vLLM also leave open (add
  --auth-health to protect them too), and /mock/*. Unlike real SGLang, /metrics is
  protected, so a gateway test can prove the key rides on load scrapes; the recorded
  request headers (per route, in /mock/stats) prove it for probes.
- Faults (error_rate, hang_rate, x-mock-status) apply to inference routes only.
  --exit-after N counts answered inference requests (errors included, hangs not) and
  exits with status 0 once the N-th answer is written.
- Prefix cache (--prefix-cache-tokens N, off by default): each worker keeps an LRU of
  16-token prompt blocks named by chained xxhash (prefix_cache.py); a request's cached
  tokens are its longest stored block prefix (never its last token), reported as
  usage.prompt_tokens_details.cached_tokens (chat, completions, the streamed usage chunk;
  /generate's meta_info.cached_tokens), counted in /mock/stats "prefix_cache". /flush_cache
  and /reset_prefix_cache empty it; /mock/reset empties it and zeroes its counters.
  --prefill-us-per-token adds that much to the time to first token per prompt token not
  served from the cache (every prompt token without one); no queueing is modelled.
- /mock/stats "requests_by_model": inference requests per model name answered (LoRA
  adapter names as sent; --strict-model rejects names other than --model).
- PD roles (SGLang style; pd.py has the bootstrap protocol): `--pd-role prefill
  --bootstrap-port B` (B+i per worker; 0: ephemeral, announced by a
  `MOCK_WORKER_BOOTSTRAP <url> <port>` line after the URL line) and `--pd-role decode
  [--pd-wait-s 5]`. Every inference request must carry bootstrap_host/_port/_room (400).
  A prefill records the room(s) when the request starts and answers one token (SGLang's
  max_new_tokens = 1); a decode answers normally only once each room is "ready" at
  bootstrap_host:bootstrap_port, else 500 "KV transfer failed: ..." (streamed: 200 at once,
  then SGLang's in-band error event and [DONE]; --pd-stream-head ready holds the head until
  the room is ready, a failure then being a 500); a null bootstrap_port is the engine's own
  --bootstrap-port, as SGLang's scheduler does. Faults apply to both
  roles; --crash-rate / crash_rate makes the process exit (status 1) at the first token.
  `smg mock-worker --grpc --pd-role ...` does the same over gRPC (grpc_pd.py: SGLang
  disaggregated_params; vLLM NIXL or --kv-connector mooncake kv_transfer_params).
- Load: running = the worker's in-flight inference requests; waiting = the configured
  fake queue; token_usage = the configured value, or else the in-flight requests'
  prompt + output tokens over --max-total-tokens.
"""

from smg.mock_worker.runner import main

__all__ = ["main"]
