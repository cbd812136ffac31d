-- wrk script for benchmarks/overhead.py: POST JSON bodies read from a file (one body per line), each
-- connection cycling through them, and one machine-readable summary line at the end.
--
--   wrk -t1 -c16 -d5s -s benchmarks/wrk_post.lua http://127.0.0.1:8000 -- bodies.jsonl /v1/predict
--
-- Without arguments the script only adds the summary line (plain GETs of the URL, e.g. /health/live).

local bodies = {}
local index = 0
local target = nil
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  if args[1] == nil then
    return
  end
  local file = assert(io.open(args[1], "r"))
  for line in file:lines() do
    bodies[#bodies + 1] = line
  end
  file:close()
  target = args[2] or "/v1/predict"
  index = math.random(#bodies) -- threads start at different bodies
end

function request()
  if target == nil then
    return wrk.format(nil, nil)
  end
  index = index % #bodies + 1
  return wrk.format("POST", target, headers, bodies[index])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
