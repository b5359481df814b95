--[[
  Release a lease by token (compare-and-delete: a stale token frees nothing) and serve the lists
  its slots were freed for.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8]  token

  Returns reply() with body { slots freed }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local n = release_token(ARGV[8])
serve_freed()
return reply({ n })
