-- wrk script for forward proxies: absolute-form requests to the origin, sent to the proxy.
-- ORIGIN is the origin's host:port, passed through the environment.
local origin = os.getenv("ORIGIN")
wrk.method = "GET"
wrk.path = "http://" .. origin .. "/"
wrk.headers["Host"] = origin
wrk.headers["X-Agent-Id"] = "bench-agent"
