-- wrk script: POST the JSON body in $PERF_BODY_FILE; with $PERF_UNIQUE=1 every request gets
-- its own number in place of REQNUM (the signed envelope's reqnum). Prints one JSON line.
local f = assert(io.open(os.getenv("PERF_BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

if os.getenv("PERF_UNIQUE") == "1" then
  local n = 0
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, (body:gsub("REQNUM", tostring(n))))
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'PERF_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "socket_errors": %d, ' ..
    '"non2xx": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
