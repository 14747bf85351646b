-- wrk script: POST one fixed JSON payload on every request and print a machine-readable
-- summary line.
--
--   wrk -t T -c C -d 10s -s post.lua http://127.0.0.1:PORT/v1/chat/completions -- PAYLOAD
--
-- PAYLOAD is a file holding the request body. With WRK_API_KEY in the environment every request
-- carries `Authorization: Bearer <key>`. With WRK_CHECK_STATUS=1 in the environment every
-- response's status is inspected in Lua and anything outside 2xx is counted; without it only
-- wrk's own counter (status > 399) is available, which is cheaper: wrk decides once, when it
-- loads the script, whether a global response() exists, and only then hands each response's
-- headers and body to Lua.
--
-- done() prints one line: WRK_SUMMARY {json}. Latencies are in microseconds.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   if path == nil then
      error("post.lua needs the payload file as its first argument (after --)")
   end
   local f = assert(io.open(path, "rb"))
   local body = f:read("*a")
   f:close()
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Accept"] = "application/json, text/event-stream"
   local key = os.getenv("WRK_API_KEY")
   if key ~= nil and key ~= "" then
      wrk.headers["Authorization"] = "Bearer " .. key
   end
   non2xx = 0
   checked = 0
end

if os.getenv("WRK_CHECK_STATUS") == "1" then
   function response(status, headers, body)
      checked = checked + 1
      if status < 200 or status > 299 then
         non2xx = non2xx + 1
      end
   end
end

function done(summary, latency, requests)
   local non2xx_total = 0
   local checked_total = 0
   for _, t in ipairs(threads) do
      non2xx_total = non2xx_total + (t:get("non2xx") or 0)
      checked_total = checked_total + (t:get("checked") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      "WRK_SUMMARY {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
      "\"non2xx\":%d,\"checked\":%d,\"status_ge_400\":%d," ..
      "\"connect_errors\":%d,\"read_errors\":%d,\"write_errors\":%d,\"timeouts\":%d," ..
      "\"latency_us\":{\"mean\":%.1f,\"max\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p99_9\":%d}}\n",
      summary.requests, summary.duration, summary.bytes,
      non2xx_total, checked_total, e.status,
      e.connect, e.read, e.write, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50.0), latency:percentile(90.0),
      latency:percentile(99.0), latency:percentile(99.9)))
end
