-- Tag fan-out, one chunk. See fanout.rs for the whole design.
--
-- KEYS[1]: the tag set. ARGV[1]: how many members to take (at most).
-- Without ARGV[2], or with it empty ("pop"): take up to ARGV[1] random members (SRANDMEMBER),
-- UNLINK them, then SREM them from the set.
-- With ARGV[2] = an SSCAN cursor ("sweep"): SSCAN one page from it, UNLINK what it returned
-- and SREM it from the set.
-- With ARGV[3] = "1", the reply also carries the members taken (the dependents cascade needs
-- to know which keys it unlinked, to follow their own dependents).
-- Either way a member leaves the set only in the same atomic step that unlinks its key, and
-- only after its UNLINK succeeded: members are read first and removed last, so a script that
-- fails halfway (a Redis Cluster node refusing a key of another slot, an OOM) leaves every
-- member it did not unlink in the set (SPOP would have removed them before the failure, and a
-- script's writes are not rolled back).
--
-- Returns {members before, members taken, members left, next cursor ("0" when popping)} (and
-- the members, with ARGV[3]), {0, 0, 0, "0"} when the set does not exist (already
-- invalidated, or never tagged), or {-1, type} when KEYS[1] holds something other than a set.
--
-- Member keys are not declared in KEYS: standalone Redis (or a Sentinel-managed primary) only;
-- Redis Cluster rejects keys of other slots (cluster mode uses fanout_cluster.lua).

-- Effects replication (the default since Redis 5) keeps replicas exact despite SRANDMEMBER's
-- random choice; Redis 4 has to be asked for it (and refuses writes after a random command
-- without it).
if redis.replicate_commands then
  redis.replicate_commands()
end

local tag = KEYS[1]
local kind = redis.call('TYPE', tag)['ok']
if kind == 'none' then
  return {0, 0, 0, '0'}
end
if kind ~= 'set' then
  return {-1, kind}
end

local count = tonumber(ARGV[1])
local before = redis.call('SCARD', tag)
local members
local cursor = '0'
if ARGV[2] == nil or ARGV[2] == '' then
  members = redis.call('SRANDMEMBER', tag, count)
else
  local page = redis.call('SSCAN', tag, ARGV[2], 'COUNT', count)
  cursor = page[1]
  members = page[2]
end

-- unpack() is bounded by the Lua stack (about 8000 values): work in slices.
local taken = #members
local first = 1
while first <= taken do
  local last = math.min(first + 999, taken)
  redis.call('UNLINK', unpack(members, first, last))
  first = last + 1
end
first = 1
while first <= taken do
  local last = math.min(first + 999, taken)
  redis.call('SREM', tag, unpack(members, first, last))
  first = last + 1
end
if ARGV[3] == '1' then
  return {before, taken, redis.call('SCARD', tag), cursor, members}
end
return {before, taken, redis.call('SCARD', tag), cursor}
