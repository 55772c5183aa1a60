-- Generation counters, several keys a call. See generation.rs for the whole design.
--
-- KEYS: the generation keys. ARGV[i]: KEYS[i]'s position, decimal digits without leading
-- zeros (an LSN, or a commit time in microseconds).
-- Sets each key to its position only when that is higher than what it holds, so a redelivered
-- or older event never moves it back. Positions are compared as digit strings (longer is
-- higher, then lexicographic), not as Lua numbers: those are doubles, exact only up to 2^53.
--
-- Returns one string, read by generation.rs: a record per key, in KEYS order, so that the
-- client reads one bulk string instead of an array per key:
--   "1\n"          set to its position;
--   "0\n"          it already held a position as high: left as it is;
--   "-1 <what>\n"  it holds something that is not a generation (another type, or a string
--                  that is not a decimal number): left as it is.
-- A command that fails (out of memory, an ACL) fails the whole call with its error, the keys
-- before it set: harmless, since the call repeated sets nothing to a lower position.

local out = {}
for i, key in ipairs(KEYS) do
  local new = ARGV[i]
  -- GET first: one call for the usual key (absent, or a number); TYPE only names what a key
  -- that is not a string holds.
  local held = redis.pcall('GET', key)
  if type(held) == 'table' then
    if string.sub(held.err, 1, 9) ~= 'WRONGTYPE' then
      -- Redis's own error, its code kept (which a raised string would lose).
      return redis.error_reply(held.err)
    end
    out[i] = '-1 ' .. redis.call('TYPE', key)['ok'] .. '\n'
  elseif held and not string.match(held, '^%d+$') then
    out[i] = '-1 string that is not a decimal number\n'
  else
    local digits = held and string.gsub(held, '^0+', '')
    if digits and (#digits > #new or (#digits == #new and digits >= new)) then
      out[i] = '0\n'
    else
      redis.call('SET', key, new)
      out[i] = '1\n'
    end
  end
end
return table.concat(out)
