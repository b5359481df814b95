--[[
  Shared start of every lease script: the common ARGV, Redis's clock, the epoch check and the
  replica heartbeat.

  KEYS[1]  <prefix>epoch (the prefix of every other key is KEYS[1] without 'epoch')
  ARGV[1]  lease ttl ms            ARGV[2] starvation ms        ARGV[3] replica id
  ARGV[4]  epoch this replica knows ('' at boot)                ARGV[5] a fresh epoch id
  ARGV[6]  Redis run id this replica knows ('' at boot)         ARGV[7] priority aging ms
  Script-specific arguments start at ARGV[8].

  Every script replies through reply(): { epoch, run id, flags, n, n values, grants... } where
  flags has 'h' when this replica's heartbeat key had vanished (other replicas may have judged it
  dead and dropped its waiters) and each grant is member, token, candidate index.
]]
local P = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local TTL = tonumber(ARGV[1])
local STARVE = tonumber(ARGV[2])
local REPLICA = ARGV[3]
local AGING = tonumber(ARGV[7])
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local GRANTS = {}
local PAUSED = false
local EPOCH, RUN, FLAGS = '', ARGV[6], ''

local function split (s, sep)
  local out = {}
  if not s then return out end
  for piece in string.gmatch(s, '([^' .. sep .. ']+)') do out[#out + 1] = piece end
  return out
end

local function pause_for (ms)
  if ms <= 0 then return end
  if redis.call('PTTL', P .. 'pause') < ms then redis.call('SET', P .. 'pause', '1', 'PX', ms) end
  PAUSED = true
end

--[[
  Grants pause whenever leases may exist that Redis no longer knows of, until every holder has
  re-asserted them by renewal or stopped its request (a holder stops what it could not renew for
  ttl/2, checking every ttl/3: within 5/6 of a ttl).
  - The epoch is missing and this replica knew one: the data was lost under it: one ttl.
  - The epoch is missing at a replica's first call: leases older than Redis's start may exist
    elsewhere; they are settled one ttl after that start (uptime), so the rest of that.
  - Redis's run id changed while the epoch survived: a restart from a snapshot or a failover,
    both of which can lose the latest leases: one ttl.
  - This replica knew another epoch created less than a ttl ago: its leases went with the old one.
]]
local function epoch_check ()
  -- one read for the three keys every script needs
  local known = redis.call('MGET', KEYS[1], P .. 'run', P .. 'pause')
  local e, run = known[1], known[2]
  PAUSED = known[3] ~= false
  if run ~= ARGV[6] or not e then
    local info = redis.call('INFO', 'server')
    local truth = string.match(info, 'run_id:(%w+)') or ''
    local up = (tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) or 0) * 1000
    if not e then
      e = ARGV[5] .. '@' .. NOW
      redis.call('SET', KEYS[1], e)
      if ARGV[4] ~= '' then pause_for(TTL) else pause_for(TTL - up) end
    elseif run and run ~= truth then
      pause_for(TTL)
    end
    if run ~= truth then redis.call('SET', P .. 'run', truth) end
    RUN = truth
  end
  if ARGV[4] ~= '' and ARGV[4] ~= e then
    local created = tonumber(string.match(e, '@(%d+)$')) or 0
    pause_for(created + TTL - NOW)
  end
  if not redis.call('SET', P .. 'replica:' .. REPLICA, '1', 'PX', TTL, 'GET') and ARGV[4] == e then FLAGS = 'h' end
  EPOCH = e
end

-- Work left to the end of a script (slots.lua: entries parked on a GPU that is still free)
local AT_END = {}

-- { epoch, run id, flags, #body, body..., grants as member, token, index triples... }
local function reply (body)
  for _, f in ipairs(AT_END) do f() end
  local out = { EPOCH, RUN, FLAGS, #body }
  for _, v in ipairs(body) do out[#out + 1] = v end
  for _, v in ipairs(GRANTS) do out[#out + 1] = v end
  return out
end

local function alive (m)
  local r = string.match(m, '^([^|]+)|')
  if not r then return false end
  if r == REPLICA then return true end
  return redis.call('EXISTS', P .. 'replica:' .. r) == 1
end
