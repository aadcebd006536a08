-- CANCEL: a QUEUED job ends CANCELLED at once; a RUNNING one is flagged, and its worker stops
-- it when its next step report or renewal sees the flag. An ended job is left as it is.
--
-- KEYS[1] job hash   KEYS[2] events stream
-- ARGV[1] group      ARGV[2] now (s)   ARGV[3] ttl (s)
--
-- Returns the job's state after the call, or nil for an unknown job.
local state = redis.call('HGET', KEYS[1], 'state')
if not state or ended(state) then return state end
redis.call('HSET', KEYS[1], 'cancel_requested', 1)
if state == 'QUEUED' then
  local stream = redis.call('HGET', KEYS[1], 'stream')
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[2])
  finish(KEYS[1], KEYS[2], stream, ARGV[1], redis.call('HGET', KEYS[1], 'entry'), ARGV[3])
  event(KEYS[2], 'CANCELLED', 0)
  return 'CANCELLED'
end
event(KEYS[2], state, redis.call('HGET', KEYS[1], 'step'))
return state
