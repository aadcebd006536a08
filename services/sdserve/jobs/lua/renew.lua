-- RENEW: renews the lease of a running attempt (XCLAIM ... JUSTID resets the entry's idle
-- time) and reports whether a cancel was requested.
--
-- KEYS[1] job hash   KEYS[2] the job's queue stream
-- ARGV[1] group      ARGV[2] consumer   ARGV[3] stream entry id   ARGV[4] attempt (token)
--
-- Returns -1 when the attempt lost its job, 1 when a cancel was requested, else 0
-- (jobs.records.Lease).
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[4]
    or redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  return -1
end
redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested'))
