-- Tag fan-out, one chunk of each of several tags. See fanout.rs for the whole design.
--
-- KEYS: the tag sets. ARGV[1]: the most members this call takes over all its tags (its bound
-- on how long it holds Redis). ARGV[2]: "1" when the reply must carry the members taken (the
-- dependents cascade follows them to their own dependents), "0" otherwise. ARGV[3]: what to do
-- with each tag set, in KEYS order, separated by spaces: "<count>" to pop, "<count>:<cursor>"
-- to sweep from an SSCAN cursor, count being how many members to take (at most). One argument
-- rather than two per set: each argument costs the client an encoding and Redis a parse.
-- Pop: take up to that many random members (SRANDMEMBER), UNLINK them, then SREM them from the
-- set. Sweep: SSCAN one page from the cursor, UNLINK what it returned and SREM it from the set.
-- Either way a member leaves its set only in the same atomic step that unlinks its key, and
-- only after its UNLINK succeeded: members are read first and removed last, so a call that
-- fails halfway (a Redis Cluster node refusing a key of another slot, an ACL) leaves every
-- member it did not unlink in the set (SPOP would have removed them before the failure, and a
-- script's writes are not rolled back).
--
-- Returns one string, read by fanout.rs: a record per tag set reached, in KEYS order, so that
-- the client reads one bulk string instead of an array per tag:
--   "<before> <taken> <left> <cursor>\n"   members before, taken, left, next cursor ("0" when
--                                          popping); "0 0 0 0\n" when the set does not exist
--                                          (already invalidated, or never tagged); with
--                                          ARGV[2] = "1", followed by the members taken, each
--                                          as "<length>:<bytes>";
--   "-1 <type>\n"                          KEYS[i] holds something other than a set: left alone;
--   "! <error>\n"                          a command failed (the error as Redis worded it):
--                                          the last record, later tag sets were not touched.
-- Tag sets after the member bound was reached have no record: they were not touched.
--
-- Member keys are not declared in KEYS: standalone Redis (or a Sentinel-managed primary) only;
-- Redis Cluster rejects keys of other slots (cluster mode uses fanout_cluster.lua).

-- Effects replication (the default since Redis 5) keeps replicas exact despite SRANDMEMBER's
-- random choice; Redis 4 has to be asked for it (and refuses writes after a random command
-- without it).
if redis.replicate_commands then
  redis.replicate_commands()
end

local out = {}
local returning = ARGV[2] == '1'

-- One chunk of the set `tag`; appends its record to `out`, returns how many members it took.
local function chunk(tag, count, cursor)
  -- SCARD first: 0 for a set that does not exist (the usual case), one call where TYPE then
  -- SCARD would be two; TYPE only names what a key that is not a set holds.
  local before = redis.pcall('SCARD', tag)
  if type(before) == 'table' then
    if string.sub(before.err, 1, 9) ~= 'WRONGTYPE' then
      error(before.err, 0)
    end
    out[#out + 1] = '-1 ' .. redis.call('TYPE', tag)['ok'] .. '\n'
    return 0
  end
  if before == 0 then
    out[#out + 1] = '0 0 0 0\n'
    return 0
  end
  local members
  local next_cursor = '0'
  if cursor == '' then
    members = redis.call('SRANDMEMBER', tag, count)
  else
    local page = redis.call('SSCAN', tag, cursor, 'COUNT', count)
    next_cursor = page[1]
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
  -- What SREM removed is what left the set (an SSCAN page may repeat a member): nothing else
  -- runs during a script, so what is left needs no second SCARD.
  local removed = 0
  first = 1
  while first <= taken do
    local last = math.min(first + 999, taken)
    removed = removed + redis.call('SREM', tag, unpack(members, first, last))
    first = last + 1
  end
  out[#out + 1] = string.format('%d %d %d %s\n', before, taken, before - removed, next_cursor)
  if returning then
    for i = 1, taken do
      out[#out + 1] = #members[i] .. ':' .. members[i]
    end
  end
  return taken
end

-- Sets already emptied (invalidated again before anyone tagged) are the usual case where a
-- tag changes often: one EXISTS over every set of the call finds when none is there.
if redis.call('EXISTS', unpack(KEYS)) == 0 then
  return string.rep('0 0 0 0\n', #KEYS)
end

local budget = tonumber(ARGV[1])
local i = 0
for asked, cursor in string.gmatch(ARGV[3], '(%d+):?(%d*)') do
  i = i + 1
  if budget <= 0 or i > #KEYS then
    break
  end
  local count = math.min(tonumber(asked), budget)
  local ok, taken = pcall(chunk, KEYS[i], count, cursor)
  if not ok then
    -- A failure inside redis.call is a string in Redis 7, a table in others.
    local message = type(taken) == 'table' and (taken.err or '?') or tostring(taken)
    out[#out + 1] = '! ' .. string.gsub(message, '[\r\n]', ' ') .. '\n'
    break
  end
  budget = budget - taken
end
return table.concat(out)
