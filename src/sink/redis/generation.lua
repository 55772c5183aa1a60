-- Generation counter, one key. See generation.rs for the whole design.
--
-- KEYS[1]: the generation key. ARGV[1]: the event's position, decimal digits without leading
-- zeros (an LSN, or a commit time in microseconds).
-- Sets the key to ARGV[1] only when that is higher than what it holds, so a redelivered or
-- older event never moves it back. Positions are compared as digit strings (longer is higher,
-- then lexicographic), not as Lua numbers: those are doubles, exact only up to 2^53.
--
-- Returns {1, position} when set, {0, held} when the key already held a position as high, or
-- {-1, what} when the key holds something that is not a generation (another type, or a string
-- that is not a decimal number): left as it is.

local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'string' then
  return {-1, kind}
end
local held = redis.call('GET', KEYS[1])
local new = ARGV[1]
if held then
  if not string.match(held, '^%d+$') then
    return {-1, 'string that is not a decimal number'}
  end
  local digits = string.gsub(held, '^0+', '')
  if #digits > #new or (#digits == #new and digits >= new) then
    return {0, held}
  end
end
redis.call('SET', KEYS[1], new)
return {1, new}
