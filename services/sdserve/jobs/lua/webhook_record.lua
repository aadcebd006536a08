-- WEBHOOK RECORD: records one delivery attempt and decides what follows (webhook_outbox.py):
-- a 2xx reply delivers the event (it leaves the due set for good); otherwise the next attempt
-- is due after delay = jitter * min(cap_s, base_s * 2^(attempts - 1)), unless that falls past
-- first attempt + retry_for_s: then the event is dead (kept, with its attempts, for inspection).
-- An attempt whose claim is no longer the event's latest (its lease ran out and another worker
-- took the event) is logged but decides nothing, unless it delivered.
--
-- KEYS[1] event hash   KEYS[2] attempts list   KEYS[3] due sorted set   KEYS[4] dead sorted set
-- ARGV[1] event id   ARGV[2] claim (token; '' for none)   ARGV[3] now   ARGV[4] status code ('' for none)
-- ARGV[5] error      ARGV[6] base_s   ARGV[7] cap_s   ARGV[8] retry_for_s   ARGV[9] jitter
-- ARGV[10] keep_s (how long a delivered event is kept)
-- ARGV[11] the key prefix of the jobs' sets of event ids (the event's job id is appended)
--
-- Returns 'delivered', 'retry', 'dead', 'stale' (a superseded failure) or 'gone'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'gone'
end
local now = tonumber(ARGV[3])
local job_set = ARGV[11] .. redis.call('HGET', KEYS[1], 'job_id')
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('RPUSH', KEYS[2], cjson.encode({at = now, status = ARGV[4], error = ARGV[5]}))
local first = tonumber(redis.call('HGET', KEYS[1], 'first_attempt') or '')
if not first then
  first = now
  redis.call('HSET', KEYS[1], 'first_attempt', ARGV[3])
end
local code = tonumber(ARGV[4])
if code and code >= 200 and code < 300 then
  redis.call('HSET', KEYS[1], 'state', 'delivered', 'delivered_at', ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  for i = 1, 2 do
    redis.call('EXPIRE', KEYS[i], ARGV[10])
  end
  local dead = false
  for _, other in ipairs(redis.call('SMEMBERS', job_set)) do
    if redis.call('ZSCORE', KEYS[4], other) then
      dead = true
    end
  end
  if not dead then
    redis.call('EXPIRE', job_set, ARGV[10])
  end
  return 'delivered'
end
if state == 'delivered' or state == 'dead'
    or (ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'claims') ~= ARGV[2]) then
  return 'stale'
end
local delay = tonumber(ARGV[9]) * math.min(tonumber(ARGV[7]),
                                           tonumber(ARGV[6]) * 2 ^ (attempts - 1))
if now + delay > first + tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[1], 'state', 'dead', 'dead_at', ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZADD', KEYS[4], now, ARGV[1])
  redis.call('PERSIST', job_set)
  return 'dead'
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'next_at', now + delay)
redis.call('ZADD', KEYS[3], now + delay, ARGV[1])
return 'retry'
