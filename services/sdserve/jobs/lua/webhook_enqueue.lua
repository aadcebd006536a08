-- WEBHOOK ENQUEUE: stores one event for delivery, once (webhook_outbox.py). Enqueuing an event
-- id that is already stored changes nothing, so a job worker that retries its end cannot send
-- the same event twice.
--
-- KEYS[1] event hash   KEYS[2] due sorted set   KEYS[3] the job's set of event ids
-- ARGV[1] event id     ARGV[2] job id   ARGV[3] url   ARGV[4] body   ARGV[5] secret ref
-- ARGV[6] now (unix seconds)
--
-- Returns 1 when the event was stored, 0 when it already was.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'job_id', ARGV[2], 'url', ARGV[3], 'body', ARGV[4],
           'secret_ref', ARGV[5], 'state', 'pending', 'created', ARGV[6], 'attempts', 0,
           'claims', 0)
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('PERSIST', KEYS[3])  -- kept while it has an event not yet delivered
return 1
