--[[
  Release leases by token (compare-and-delete: a stale token frees nothing) and serve the lists
  their slots were freed for. The releases a replica makes in one turn of its event loop share
  one call: one epoch check, one serving pass, one write.

  KEYS[1]  <prefix>epoch
  ARGV[1..7] see includes/prelude.lua
  ARGV[8..] tokens

  Returns reply() with body { slots freed, per token in order }
]]
--- @include "includes/prelude"
--- @include "includes/slots"
--- @include "includes/queue"

epoch_check()
expire_due()
local freed_slots = {}
for i = 8, #ARGV do
  freed_slots[#freed_slots + 1] = release_token(ARGV[i])
end
serve_freed()
return reply(freed_slots)
