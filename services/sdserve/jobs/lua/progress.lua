-- PROGRESS: records step k of N of a running attempt.
--
-- KEYS[1] job hash   KEYS[2] events stream
-- ARGV[1] attempt (token)   ARGV[2] steps done   ARGV[3] steps in all
--
-- Returns as RENEW: -1 (the attempt lost its job), 1 (cancel requested) or 0.
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return -1
end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total_steps', ARGV[3])
event(KEYS[2], 'RUNNING', ARGV[2])
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested'))
