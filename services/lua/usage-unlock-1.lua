--[[
  Ends a roll-up's turn: deletes the lock only while it still holds this roll-up's token (after
  its expiry another replica may hold it).

    Input:
      KEYS[1] '<prefix>usage:rollup-lock'
      ARGV[1] the token the lock was taken with

    Output:
      1 when deleted, else 0
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
