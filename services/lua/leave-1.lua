--[[
  A waiter leaves its line (client gone, timed out, sent away); a lease granted to it meanwhile
  is released.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  member

  Returns reply() with body {}
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local m = ARGV[8]
local w = redis.call('HMGET', P .. 'w:' .. m, 'token', 'line', 'list')
drop_waiter(m)
if w[1] then release_token(w[1]) end
if w[2] then reindex(w[3], w[2]) end
serve_freed()
return reply({})
