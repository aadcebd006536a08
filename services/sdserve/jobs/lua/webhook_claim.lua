-- WEBHOOK CLAIM: takes up to `limit` events whose next attempt is due, each for `lease_s`
-- (webhook_outbox.py). A claimed event's score moves to now + lease_s, so no other worker takes
-- it meanwhile, and it comes due again by itself if its worker dies before recording the
-- attempt (then it is sent again: at-least-once). Each claim increments the event's `claims`,
-- the fencing token that record_attempt checks.
--
-- KEYS[1] due sorted set   ARGV[1] now   ARGV[2] limit   ARGV[3] lease_s
-- ARGV[4] the event hash key prefix (the event id is appended)
--
-- Returns a flat list: event id, claims, job id, url, body, secret ref, attempts; per event.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[4] .. id
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), id)
    local claims = redis.call('HINCRBY', key, 'claims', 1)
    redis.call('HSET', key, 'state', 'sending')
    local f = redis.call('HMGET', key, 'job_id', 'url', 'body', 'secret_ref', 'attempts')
    table.insert(out, id)
    table.insert(out, claims)
    for _, v in ipairs(f) do
      table.insert(out, v)
    end
  end
end
return out
