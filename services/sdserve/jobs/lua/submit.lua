-- SUBMIT: queues a job, unless its idempotency key names one already or the queue is full.
--
-- KEYS[1] job hash        KEYS[2] events stream   KEYS[3] the priority's queue stream
-- KEYS[4] idempotency key KEYS[5] the tenant's jobs (a sorted set by submission time)
-- KEYS[6..] every priority's queue stream (to count what waits)
-- ARGV[1] job id          ARGV[2] request bytes   ARGV[3] priority      ARGV[4] now (s)
-- ARGV[5] total steps     ARGV[6] max queue length ARGV[7] ttl (s)
-- ARGV[8] '1' when an idempotency key is given     ARGV[9] the idempotency key
-- ARGV[10] the tenant that submits it ("" without API keys)
-- ARGV[11] its callback URL ("": none)  ARGV[12] the webhooks' pending set (its end goes there)
--
-- Returns {job id, 1} for a new job, {existing job id, 0} for a known idempotency key, or
-- the error 'QUEUE_FULL <jobs waiting or running>'.
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {existing, 0} end
end
local waiting = 0
for i = 6, #KEYS do waiting = waiting + redis.call('XLEN', KEYS[i]) end
if waiting >= tonumber(ARGV[6]) then return redis.error_reply('QUEUE_FULL ' .. waiting) end
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'priority', ARGV[3], 'request', ARGV[2],
  'created_at', ARGV[4], 'attempts', 0, 'step', 0, 'total_steps', ARGV[5],
  'stream', KEYS[3], 'entry', entry, 'cancel_requested', 0, 'tenant', ARGV[10])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'callback_url', ARGV[11], 'webhook_pending', ARGV[12])
end
if ARGV[8] == '1' then
  redis.call('SET', KEYS[4], ARGV[1])  -- expires with the job, once it has ended
  redis.call('HSET', KEYS[1], 'idempotency_key', ARGV[9], 'idem', KEYS[4])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 64, '*', 'state', 'QUEUED', 'step', 0)
-- The tenant's list keeps its newest 1000 jobs; entries whose job expired are skipped on read.
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -1001)
return {ARGV[1], 1}
