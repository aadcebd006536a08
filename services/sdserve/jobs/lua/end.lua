-- END: ends an attempt. outcome: SUCCEEDED | FAILED | CANCELLED | RETRY (a failure worth
-- another attempt: the entry stays pending, so XAUTOCLAIM hands it out again after the lease,
-- unless this was the last attempt: then FAILED).
--
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] the job's queue stream
-- KEYS[4] result key
-- ARGV[1] group      ARGV[2] stream entry id   ARGV[3] attempt (token)   ARGV[4] outcome
-- ARGV[5] now (s)    ARGV[6] ttl (s)           ARGV[7] error             ARGV[8] result bytes
-- ARGV[9] max attempts
--
-- Returns the job's new state (QUEUED after a retry), or false when the attempt no longer
-- owned the job (nothing was written).
local state = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] or state ~= 'RUNNING' then
  return false
end
local outcome = ARGV[4]
if outcome == 'RETRY' then
  if tonumber(ARGV[3]) < tonumber(ARGV[9]) then
    redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'error', ARGV[7], 'step', 0)
    event(KEYS[2], 'QUEUED', 0)
    return 'QUEUED'
  end
  outcome = 'FAILED'
end
if outcome == 'SUCCEEDED' then
  redis.call('SET', KEYS[4], ARGV[8], 'EX', ARGV[6])
end
redis.call('HSET', KEYS[1], 'state', outcome, 'error', ARGV[7], 'finished_at', ARGV[5])
finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[6])
event(KEYS[2], outcome, redis.call('HGET', KEYS[1], 'step'))
return outcome
