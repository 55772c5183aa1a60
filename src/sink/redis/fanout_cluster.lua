-- Tag fan-out in Redis Cluster, one chunk. See fanout.rs for the whole design.
--
-- KEYS[1]: the tag set. KEYS[2]: its pending set, in the same hash slot (a `{tag}` chosen for
-- that slot). ARGV[1]: how many members to take (at most).
-- Without ARGV[2] ("pop"): up to ARGV[1] random members (SRANDMEMBER).
-- With ARGV[2] = an SSCAN cursor ("sweep"): one SSCAN page from it.
-- Either way the members are moved from the tag set to the pending set (SADD, then SREM) in
-- one atomic step, and returned. The member keys live in other slots, which this node may not
-- touch: the client unlinks them slot by slot and only then SREMs them from the pending set.
-- So a member is always in the tag set, in the pending set, or unlinked: never orphaned.
-- Pending sets left by a crash are finished by the next start.
--
-- Returns one string, the record fanout.lua returns for one tag set with its members (read by
-- fanout.rs; one bulk string parses far cheaper than nested arrays):
-- "<before> <taken> <left> <cursor>\n" followed by the members moved, each as
-- "<length>:<bytes>"; "0 0 0 0\n" when the set does not exist; "-1 <type>\n" when KEYS[1]
-- holds something other than a set.

if redis.replicate_commands then
  redis.replicate_commands()
end

local tag = KEYS[1]
local pending = KEYS[2]
-- SCARD first: 0 for a set that does not exist, one call where TYPE then SCARD would be two.
local before = redis.pcall('SCARD', tag)
if type(before) == 'table' then
  if string.sub(before.err, 1, 9) ~= 'WRONGTYPE' then
    return before
  end
  return '-1 ' .. redis.call('TYPE', tag)['ok'] .. '\n'
end
if before == 0 then
  return '0 0 0 0\n'
end

local count = tonumber(ARGV[1])
local members
local cursor = '0'
if ARGV[2] == nil then
  members = redis.call('SRANDMEMBER', tag, count)
else
  local page = redis.call('SSCAN', tag, ARGV[2], 'COUNT', count)
  cursor = page[1]
  members = page[2]
end

-- unpack() is bounded by the Lua stack (about 8000 values): work in slices. SADD first: if it
-- fails (OOM), nothing has left the tag set.
local taken = #members
local first = 1
while first <= taken do
  local last = math.min(first + 999, taken)
  redis.call('SADD', pending, unpack(members, first, last))
  first = last + 1
end
-- What SREM removed is what left the set (an SSCAN page may repeat a member).
local removed = 0
first = 1
while first <= taken do
  local last = math.min(first + 999, taken)
  removed = removed + redis.call('SREM', tag, unpack(members, first, last))
  first = last + 1
end
local out = {string.format('%d %d %d %s\n', before, taken, before - removed, cursor)}
for i = 1, taken do
  out[i + 1] = #members[i] .. ':' .. members[i]
end
return table.concat(out)
