-- `delta show` names who pushed each version from the push's audit row (`ns/name:vN`):
-- looked up by action and target, not by scanning the whole log.
CREATE INDEX audit_action_target ON audit (action, target);
