-- Prints the latency percentiles in microseconds on one parseable line.
local origin = os.getenv("ORIGIN")
if origin and os.getenv("FORWARD") == "1" then
  wrk.path = "http://" .. origin .. "/"
  wrk.headers["Host"] = origin
  wrk.headers["X-Agent-Id"] = "bench-agent"
end
done = function(summary, latency, requests)
  io.write(string.format("LATENCY p50=%d p99=%d\n", latency:percentile(50), latency:percentile(99)))
end
