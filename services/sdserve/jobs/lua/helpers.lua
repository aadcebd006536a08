-- Helpers shared by the scripts below (prepended to start, progress, end and cancel).
--
-- finish(): a job ended (END, START's dead letter, CANCEL): acknowledge and delete its stream
-- entry, and start the TTLs of the job, its events and its idempotency key. A job with a
-- callback URL goes into the webhooks' pending set, in the same step as its end.
local function finish(job, events, stream, group, entry, ttl)
  local pending = redis.call('HGET', job, 'webhook_pending')
  if pending then redis.call('SADD', pending, job) end
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  local idem = redis.call('HGET', job, 'idem')
  if idem then redis.call('EXPIRE', idem, ttl) end
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
end
-- event(): appends a state change (or a step) to the job's short events stream (WatchJob).
local function event(events, state, step)
  redis.call('XADD', events, 'MAXLEN', '~', 64, '*', 'state', state, 'step', step)
end
local function ended(state)
  return state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED'
end
