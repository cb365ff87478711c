-- Argo CD health check for finetune.loraops.dev/LoRAJob.
--
-- Progressing while the job is pending, queued or running (the message says where
-- it is: the queue reason, or the step and percent), Healthy once the adapter of the
-- declared spec is written, Degraded when the job failed or its spec was refused
-- (the message is the reason, what happened and what to change), Suspended while
-- spec.suspend holds it.
--
-- It reads the kstatus conditions the operator writes (Ready, Reconciling, Stalled,
-- each with observedGeneration) and status.phase; a status the operator has not
-- written yet for the current generation is Progressing, never a stale Healthy.
-- Argo CD runs it in gopher-lua (Lua 5.1).
local hs = {}

local function condition(conditions, type)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

-- "reason: message", either alone when the other is missing.
local function join(reason, message)
  local has_reason = reason ~= nil and reason ~= ""
  local has_message = message ~= nil and message ~= ""
  if has_reason and has_message then
    return reason .. ": " .. message
  elseif has_reason then
    return reason
  elseif has_message then
    return message
  end
  return "the job failed"
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to accept the job"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition(status.conditions, "Stalled")
if status.phase == "Failed" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  local reason = status.failureReason
  local message = status.failureMessage
  if stalled ~= nil and stalled.status == "True" then
    reason = stalled.reason
    message = stalled.message
  end
  hs.message = join(reason, message)
  if status.hint ~= nil and status.hint ~= "" then
    hs.message = hs.message .. " (hint: " .. status.hint .. ")"
  end
  return hs
end

local ready = condition(status.conditions, "Ready")
if status.phase == "Succeeded" and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  if status.adapter ~= nil and status.adapter.uri ~= nil then
    hs.message = "Adapter written to " .. status.adapter.uri
  else
    hs.message = ready.message
  end
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended: set spec.suspend to false to resume"
  return hs
end

-- Pending, Queued or Running (and a Succeeded job whose Ready summary is not written yet).
hs.status = "Progressing"
local reconciling = condition(status.conditions, "Reconciling")
local reason = status.phase
if reconciling ~= nil and reconciling.reason ~= nil then
  reason = status.phase .. " (" .. reconciling.reason .. ")"
end
local progress = status.progress
if status.phase == "Running" and progress ~= nil and progress.totalSteps ~= nil then
  local step = progress.step or 0
  hs.message = reason .. ": step " .. tostring(step) .. "/" .. tostring(progress.totalSteps)
  if progress.percent ~= nil then
    hs.message = hs.message .. string.format(" (%.0f%%)", progress.percent)
  end
elseif reconciling ~= nil and reconciling.message ~= nil and reconciling.message ~= "" then
  hs.message = reason .. ": " .. reconciling.message
else
  hs.message = reason
end
return hs
