-- wrk script for scripts/bench_http.py. Environment:
--   BENCH_MODE   recommend | events | healthz
--   BENCH_USERS  number of seeded users (ids bench-1 .. bench-N)
--   BENCH_ITEMS  file with one item id per line (events)
--   BENCH_DELAY_MS  pause before each request on a connection (paced runs; 0 = closed loop)
local mode = os.getenv("BENCH_MODE") or "healthz"
local users = tonumber(os.getenv("BENCH_USERS") or "1")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local items = {}

function setup(thread)
  thread:set("id", tostring(thread))
end

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
  local path = os.getenv("BENCH_ITEMS")
  if path then
    for line in io.lines(path) do
      items[#items + 1] = line
    end
  end
end

local json = { ["Content-Type"] = "application/json" }

function request()
  if mode == "recommend" then
    local body = string.format('{"user_id":"bench-%d","k":10}', math.random(users))
    return wrk.format("POST", "/recommend", json, body)
  elseif mode == "events" then
    local body = string.format(
      '{"events":[{"user_id":"bench-%d","item_id":"%s"}]}',
      math.random(users), items[math.random(#items)]
    )
    return wrk.format("POST", "/events", json, body)
  end
  return wrk.format("GET", "/healthz")
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, '
      .. '"errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, e.connect + e.read + e.write + e.status + e.timeout
  ))
end
