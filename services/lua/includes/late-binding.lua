--[[
  Late binding (CONTRACT 16.2, 16.3): a server that frees goes to the waiter it serves cheapest
  among the first few of its lists' lines, not simply to the first. Needs prelude.lua, slots.lua
  and queue.lua (included by queue.lua, before serve).

  A waiter of Scheduler v3 carries in w:<member>:
    holder  the assignment holding its prompt's prefix ('' none)
    pin     until when (Redis ms) it takes only its holder or, without one, a server whose last
            lease was for its model (the estimate says waiting for them beats a cold server)
    pass    from when (Redis ms; its arrival + AFFINITY_MAX_WAIT_MS) it may no longer be passed
            over: it is then served strictly first, as every waiter without one always is
  res:<q>   zset a -> time of its last lease      assignments whose last lease was for queue q
            (to a second; queue.lua's note_resident; asg:<a> fields q, qt name that queue and
            that time)

  Serving list l looks at the first LB_WAITERS waiters (fair order) of each of its first LB_LINES
  lines (by their next waiter's arrival), and grants, in this order:
    1. the first whose holder is free;
    2. the first (not pinned to its holder) with a free server whose last lease was for its model;
    3. the first one not pinned, anything free: a server whose taking leaves every other model
       resident somewhere first, then as before (its preferred first, then list order); one that
       cannot be served means none behind it can (they want the same candidates).
  A pin holds only while there is something to wait for: a holder in the list, or servers with
  its model resident; without either the waiter may go anywhere.
  Unless the line's first waiter may no longer be passed over: then it alone is tried. Bounded:
  at most LB_LINES * LB_WAITERS records and RES_MAX resident servers per queue are read.
]]
local LB_WAITERS = 8
local LB_LINES = 4
local RES_MAX = 8

-- The servers of list l whose last lease was for queue q (the RES_MAX latest), in the order find
-- takes free ones: the waiter's preferred (pref, comma-separated) first, then list order.
-- { { pos, a }... }
local function resident_in (l, q, pref)
  local rank = {}
  for i, a in ipairs(split(pref, ',')) do rank[a] = i end
  local out = {}
  for _, a in ipairs(redis.call('ZREVRANGE', P .. 'res:' .. q, 0, RES_MAX - 1)) do
    local pos = redis.call('HGET', P .. 'lpos:' .. l, a)
    if pos then out[#out + 1] = { tonumber(pos), a, rank[a] or (RES_MAX + tonumber(pos)) } end
  end
  table.sort(out, function (x, y) return x[3] < y[3] end)
  return out
end

-- A free server of list l for m whose taking costs no other model its last resident server: one
-- whose last lease was for no model, or for one resident elsewhere too (among the first RES_MAX
-- entries of the list's free index). Returns pos, a, n, or nil.
local function spare (m, l, want)
  for _, pos in ipairs(redis.call('ZRANGE', P .. 'free:' .. l, 0, RES_MAX - 1)) do
    local a = redis.call('HGET', P .. 'list:' .. l, pos)
    if a then
      local ok, _, n = usable(a, m, want)
      if ok then
        local q = asg_queue(a)
        if not q or redis.call('ZCARD', P .. 'res:' .. q) > 1 then return tonumber(pos), a, n end
      end
    end
  end
  return nil
end

-- Holder a of list l usable by m now: pos, slots in use; nil otherwise.
local function holder_free (m, l, a, want)
  if not a or a == '' then return nil end
  local pos = redis.call('HGET', P .. 'lpos:' .. l, a)
  if not pos then return nil end
  local ok, _, n = usable(a, m, want)
  if ok then return tonumber(pos), n end
  return nil
end

--[[
  Where a request new to its line may go at once: its holder; unless pinned to that holder, a
  server whose last lease was for its model; while pinned (to a holder in the list, or to its
  model's resident servers when there are any), nothing else; otherwise what find gives.
  Returns pos, a, n, or nil. (A list of one candidate takes the plain find: attempt-1.lua.)
]]
local function find_new (m, l, q, pref, want, since, holder, pin_until)
  local pos, n = holder_free(m, l, holder, want)
  if pos then return pos, holder, n end
  local to_holder = holder ~= '' and redis.call('HEXISTS', P .. 'lpos:' .. l, holder) == 1
  if pin_until > NOW and to_holder then return nil end
  local res = resident_in(l, q, pref)
  for _, r in ipairs(res) do
    local ok, _, used_n = usable(r[2], m, want)
    if ok then return r[1], r[2], used_n end
  end
  if pin_until > NOW and #res > 0 then return nil end
  local spos, sa, sn = spare(m, l, want)
  if spos then return spos, sa, sn end
  return find(m, l, pref, want, nil, since)
end

--[[
  Serve list l, whose first line is ln with next waiter m. Returns the member granted, its token
  and position, or nil.
]]
local function serve_list (l, ln, m)
  local first = waiter_of(m)
  local pass = tonumber(first[15])
  if not pass or NOW >= pass then
    -- strictly first: no pin can outlast its pass (AFFINITY_MAX_WAIT_MS caps both)
    local token, pos = try_grant(m, first)
    if token then return m, token, pos end
    return nil
  end
  -- the window: m first, then the first waiters of the first lines
  local ws = { { m, ln, first } }
  local seen = { [m] = true }
  local lns = { ln }
  for _, o in ipairs(redis.call('ZRANGE', P .. 'lines:' .. l, 0, LB_LINES - 1)) do
    if o ~= ln then lns[#lns + 1] = o end
  end
  for i = 1, math.min(#lns, LB_LINES) do
    for _, o in ipairs(redis.call('ZRANGE', P .. 'line:' .. lns[i], 0, LB_WAITERS - 1)) do
      if not seen[o] then
        seen[o] = true
        if alive(o) then
          local w = waiter_of(o)
          -- (a record gone is not waiting)
          if w[1] then ws[#ws + 1] = { o, lns[i], w } end
        end
      end
    end
  end
  local function granted (e, pos, a, n)
    local token = grant_at(e[1], e[3], pos, a, n)
    reindex(l, e[2])
    return e[1], token, pos
  end
  local res_of = {}
  -- (per queue and preference: waiters of one request path share both)
  local function resident (q, pref)
    local key = q .. '/' .. (pref or '')
    local res = res_of[key]
    if not res then
      res = resident_in(l, q, pref)
      res_of[key] = res
    end
    return res
  end
  -- What each waiter is pinned to while its pin runs: its holder when in the list, else its
  -- model's resident servers when there are any; nothing then (it may go anywhere).
  local function pinned_to (w)
    if (tonumber(w[14]) or 0) <= NOW then return nil end
    if w[13] and w[13] ~= '' and redis.call('HEXISTS', P .. 'lpos:' .. l, w[13]) == 1 then return 'holder' end
    if #resident(w[3], w[5]) > 0 then return 'model' end
    return nil
  end
  -- 1. a free holder goes to the waiter whose prefix it holds
  for _, e in ipairs(ws) do
    local w = e[3]
    local pos, n = holder_free(e[1], l, w[13], w[4])
    if pos then return granted(e, pos, w[13], n) end
  end
  -- 2. a free server with a model resident goes to a waiter of that model (not one pinned to its holder)
  local pins = {}
  for i, e in ipairs(ws) do
    local w = e[3]
    pins[i] = pinned_to(w)
    if pins[i] ~= 'holder' then
      for _, r in ipairs(resident(w[3], w[5])) do
        local ok, _, n = usable(r[2], e[1], w[4])
        if ok then return granted(e, r[1], r[2], n) end
      end
    end
  end
  -- 3. the first one free to go anywhere
  for i, e in ipairs(ws) do
    if not pins[i] then
      local spos, sa, sn = spare(e[1], l, e[3][4])
      if spos then return granted(e, spos, sa, sn) end
      local token, pos = try_grant(e[1], e[3])
      if token then
        reindex(l, e[2])
        return e[1], token, pos
      end
      return nil
    end
  end
  return nil
end
