-- Tag fan-out, one chunk. See fanout.rs for the whole design.
--
-- KEYS[1]: the tag set. ARGV[1]: how many members to take (at most).
-- Without ARGV[2] ("pop"): SPOP up to ARGV[1] members and UNLINK them.
-- With ARGV[2] = an SSCAN cursor ("sweep"): SSCAN one page from it, UNLINK what it returned
-- and SREM it from the set.
-- Either way a member leaves the set only in the same atomic step that unlinks its key.
--
-- Returns {members before, members taken, members left, next cursor ("0" when popping)},
-- {0, 0, 0, "0"} when the set does not exist (already invalidated, or never tagged), or
-- {-1, type} when KEYS[1] holds something other than a set.
--
-- Member keys are not declared in KEYS: standalone Redis (or a Sentinel-managed primary) only;
-- Redis Cluster would reject keys of other slots.

-- Effects replication (the default since Redis 5) keeps replicas exact despite SPOP's random
-- choice; Redis 4 has to be asked for it.
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
if ARGV[2] == nil then
  members = redis.call('SPOP', tag, count)
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
  if ARGV[2] ~= nil then
    redis.call('SREM', tag, unpack(members, first, last))
  end
  first = last + 1
end
return {before, taken, redis.call('SCARD', tag), cursor}
