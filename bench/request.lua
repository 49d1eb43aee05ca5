-- wrk script for make bench: one fixed request per scenario, configured from the environment, and
-- a one-line machine-readable summary at the end. Used by bench/run.sh for every scenario.
--
--   BENCH_METHOD   GET (default) or POST
--   BENCH_BODY     request body (POST)
--   BENCH_CTYPE    Content-Type of the body
--   BENCH_AUTH     value of the Authorization header ("Basic ...", "Bearer ...")
--   BENCH_HEADER   one more header, as "Name: value" (e.g. "X-API-Key: aidp_key_...")
--
-- The request is built once per thread with wrk.format, so the script adds no per-request work.

local function env(name)
  local v = os.getenv(name)
  if v == nil or v == "" then return nil end
  return v
end

local method = env("BENCH_METHOD") or "GET"
local body = env("BENCH_BODY")
local headers = {}
if env("BENCH_CTYPE") then headers["Content-Type"] = env("BENCH_CTYPE") end
if env("BENCH_AUTH") then headers["Authorization"] = env("BENCH_AUTH") end
local extra = env("BENCH_HEADER")
if extra then
  local name, value = extra:match("^([^:]+):%s*(.*)$")
  if name then headers[name] = value end
end

local req

init = function(args)
  req = wrk.format(method, wrk.path, headers, body)
end

request = function()
  return req
end

-- Requests/s over the whole run, latency percentiles in milliseconds, and the error counts:
-- `status` is wrk's count of responses with a status of 400 or more; the others are socket errors.
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d secs=%.3f rps=%.1f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f max_ms=%.3f " ..
    "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000,
    e.status, e.connect, e.read, e.write, e.timeout))
end
