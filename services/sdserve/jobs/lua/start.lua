-- START: begins an attempt at a delivered job, or settles the job without running it.
--
-- KEYS[1] job hash   KEYS[2] events stream   KEYS[3] the job's queue stream
-- ARGV[1] group      ARGV[2] consumer        ARGV[3] stream entry id   ARGV[4] now (s)
-- ARGV[5] max attempts                       ARGV[6] ttl (s)
--
-- Returns {attempt, 'RUNNING', request bytes, total steps} when the attempt starts (the
-- attempt number is its fencing token), else {0, why}: 'not ours' (another worker reclaimed
-- the entry), 'expired', the state it had ended in, 'CANCELLED', or 'FAILED' (used up).
if #redis.call('XPENDING', KEYS[3], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then
  return {0, 'not ours'}  -- reclaimed by another worker since we read it
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  return {0, 'expired'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if ended(state) then
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  return {0, state}
end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[4])
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  event(KEYS[2], 'CANCELLED', 0)
  return {0, 'CANCELLED'}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
if attempts >= tonumber(ARGV[5]) then
  local last = redis.call('HGET', KEYS[1], 'error')
  local why = 'gave up after ' .. attempts .. ' attempts'
  if last and last ~= '' then why = why .. '; last: ' .. last
  else why = why .. ': each ended without a result (its worker died or lost its lease)' end
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'error', why, 'finished_at', ARGV[4])
  finish(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[3], ARGV[6])
  event(KEYS[2], 'FAILED', 0)
  return {0, 'FAILED'}
end
attempts = attempts + 1
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'attempts', attempts, 'started_at', ARGV[4],
  'worker', ARGV[2], 'step', 0)
event(KEYS[2], 'RUNNING', 0)
return {attempts, 'RUNNING', redis.call('HGET', KEYS[1], 'request'),
  redis.call('HGET', KEYS[1], 'total_steps')}
